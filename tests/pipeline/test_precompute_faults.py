"""Precompute under crashes, dead workers, bad samples and concurrent runs: real Ray, real tars, real zarr."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from pipeline.cli import main as cli
from pipeline.data.errors import UsageError
from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.verify import verify_store
from tests.conftest import DEMO_BLOCKS, DEMO_TEACHERS, REPO, SMALL_BLOCKS, small_block_flags
from tests.pipeline.test_store_promises import store_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEACHERS = ("depth", "seg", "gen")


def array_files(store: Path) -> dict[str, bytes]:
    """Every file of the arrays and the index, by path: what 'byte for byte' compares."""
    files = {"index.parquet": (store / "index.parquet").read_bytes()}
    for name in TEACHERS:
        for path in sorted((store / name).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(store))] = path.read_bytes()
    return files


def wait_for_records(store: Path, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((store / "_blocks").rglob("*.json"))) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {at_least} block records in {store} after {timeout}s")


def test_kill_9_of_the_whole_job_then_rerun_gives_the_same_bytes(demo_dir, small_block_store, tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", str(demo_dir / "shards"),
               "--teachers", str(DEMO_TEACHERS), "--store", str(store), *small_block_flags(), "--quiet"]
    job = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for_records(store, at_least=2)
    finally:
        # The whole job: the driver, its local Ray and every worker share the new session's process group.
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    total = 3 * len(list((small_block_store / "_blocks" / "depth").glob("*.json")))
    assert len(list((store / "_blocks").rglob("*.json"))) < total, "the job finished before it was killed"

    # The rerun on the session's Ray: what it must find is the killed job's store, not its Ray.
    run_precompute(str(demo_dir / "shards"), str(DEMO_TEACHERS), str(store), PrecomputeConfig(**SMALL_BLOCKS),
                   progress=False)
    assert array_files(store) == array_files(small_block_store)
    assert not (store / "_lock").exists()


# Where the driver can die: inside store creation, after Ray started, after the first block, halfway, after the
# last block record, and inside the finish (errors.parquet written, some teachers complete).
# The tasks feed (prepare and write as CPU tasks) is killed halfway too; the rerun uses the default feed.
PHASES = [(phase, "inline") for phase in
          ("store-created", "ray-started", "first-block", "mid-run", "last-record", "finish")] + [("mid-run", "tasks")]


@pytest.mark.parametrize("phase, feed", PHASES)
def test_kill_9_of_the_driver_at_each_phase_then_rerun_gives_a_verified_identical_store(
        phase, feed, demo_dir, small_block_store, ray_local, tmp_path):
    store = tmp_path / "store"
    # The killed driver joins the session's Ray, as a driver of a cluster does (a local Ray of its own dies with it:
    # `test_kill_9_of_the_whole_job...`, `test_a_killed_driver_leaves_no_ray_process_behind`).
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", str(demo_dir / "shards"),
               "--teachers", str(DEMO_TEACHERS), "--store", str(store), "--quiet", "--feed", feed,
               "--address", ray_local.get_runtime_context().gcs_address, *small_block_flags()]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PIPELINE_KILL_AT": phase})
    assert killed.returncode == -signal.SIGKILL, f"the run did not die at {phase}: {killed.stderr[-2000:]}"
    if (store / "zarr.json").exists():  # what the killed run left is no finished store, and verify says so
        assert cli(["verify", str(store), "--quiet"]) != 0

    summary = run_precompute(str(demo_dir / "shards"), str(DEMO_TEACHERS), str(store), PrecomputeConfig(**SMALL_BLOCKS),
                             progress=False)
    assert not summary.nothing_to_do
    assert verify_store(str(store), shards=str(demo_dir / "shards"), manifest=str(DEMO_TEACHERS)).problems == []
    got, want = store_files(store), store_files(small_block_store)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


def test_the_tasks_feed_writes_the_same_store_as_the_inline_feed(demo_dir, small_block_store, ray_local, tmp_path):
    store = tmp_path / "store"
    config = PrecomputeConfig(**SMALL_BLOCKS, feed="tasks")
    summary = run_precompute(str(demo_dir / "shards"), str(DEMO_TEACHERS), str(store), config, progress=False)
    assert summary.feed == "tasks" and summary.blocks_computed == 3 * len(list((store / "_blocks" / "depth").iterdir()))
    assert store_files(store) == store_files(small_block_store)


# The tasks feed on a CPU machine has one worker: losing it leaves none until Ray's restart answers.
@pytest.mark.parametrize("feed", ["inline", "tasks"])
def test_a_killed_worker_actor_is_replaced_and_the_store_completes(feed, demo_dir, small_block_store, tmp_path):
    store = tmp_path / "store"
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = run_precompute(
                str(demo_dir / "shards"), str(DEMO_TEACHERS), str(store),
                PrecomputeConfig(**SMALL_BLOCKS, feed=feed), progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_records(store, at_least=1)
    # This process's own Ray (its raylet is our child), not another test process's.
    workers = [p for p in psutil.Process().children(recursive=True) if _name(p).startswith("ray::BlockWorker")]
    assert workers, "no worker actor process found"
    workers[0].send_signal(signal.SIGKILL)
    # What a worker killed inside a write leaves (the kill above lands there only sometimes): its temporary file.
    chunks = store / "seg" / "target" / "c" / "0" / "0"
    chunks.mkdir(parents=True, exist_ok=True)
    (chunks / f"0.tmp-{workers[0].pid}").write_bytes(b"half a chunk")
    thread.join(timeout=240)
    assert "error" not in outcome, outcome.get("error")
    assert array_files(store) == array_files(small_block_store)


# ---- bad input ------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_bad_shards(demo_dir: Path, out: Path) -> dict[str, str]:
    """Two shards mixing good demo samples with every kind of bad one; returns {key: what is wrong}."""
    out.mkdir()
    good = []
    with tarfile.open(sorted((demo_dir / "shards").glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in sorted(members):
        if name.endswith(".jpg"):
            key = name[:-4]
            good.append((key, members[name], members.get(f"{key}.txt", b"")))
    bad = {}
    with tarfile.open(out / "bad-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in good[:3]:
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", txt)
        _add(tar, "zero.jpg", b"")
        _add(tar, "zero.txt", b"an empty file")
        bad["zero"] = "empty image"
        _add(tar, "corrupt.jpg", good[0][1][: len(good[0][1]) // 3])
        _add(tar, "corrupt.txt", b"the first third of a jpeg")
        bad["corrupt"] = "cannot decode"
        _add(tar, "notanimage.jpg", b"%PDF-1.4 this is not an image at all")
        _add(tar, "notanimage.txt", b"a pdf with a jpg name")
        bad["notanimage"] = "cannot decode"
        _add(tar, "bomb.png", _png(Image.new("1", (12000, 12000))))
        _add(tar, "bomb.txt", b"144 megapixels of nothing")
        bad["bomb"] = "over the limit"
        _add(tar, "nocaption.jpg", good[3][1])  # valid targets, caption_present = false
        _add(tar, "cmyk.jpg", _jpeg(Image.open(io.BytesIO(good[4][1])).convert("CMYK")))
        _add(tar, "cmyk.txt", b"a CMYK jpeg: converted, not an error")
        _add(tar, f"{good[0][0]}.jpg", good[5][1])  # the first key again, later in the shard
        _add(tar, f"{good[0][0]}.txt", b"a duplicate key")
        bad[f"dup:{good[0][0]}"] = "duplicate key"
    # A truncated shard: two whole samples, then a cut inside the third sample's image.
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in good[6:9]:
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", txt)
    data = whole.getvalue()
    cut = data.index(good[8][1][:64]) + 100
    (out / "bad-00001.tar").write_bytes(data[:cut])
    bad[f"truncated:{good[8][0]}"] = "truncated"
    return bad


def test_every_kind_of_bad_sample_is_recorded_and_good_samples_match_the_clean_run(demo_dir, demo_store, tmp_path):
    write_bad_shards(demo_dir, tmp_path / "shards")
    store = tmp_path / "store"
    summary = run_precompute(str(tmp_path / "shards"), str(DEMO_TEACHERS), str(store),
                             PrecomputeConfig(rows_per_block=4, rows_per_chunk=2, workers=1), progress=False)
    index = pq.read_table(store / "index.parquet").to_pylist()
    errors = pq.read_table(store / "errors.parquet").to_pylist()
    by_sample = {}
    for error in errors:
        by_sample.setdefault(error["sample"], []).append(error)

    def errors_of(key):
        return [e for r in index if r["key"] == key for e in by_sample.get(r["row"], [])]

    assert {e["teacher"] for e in errors_of("zero")} == set(TEACHERS)
    assert "empty image" in errors_of("zero")[0]["error"]
    assert "cannot decode" in errors_of("corrupt")[0]["error"]
    assert "cannot decode" in errors_of("notanimage")[0]["error"]
    assert "over the limit" in errors_of("bomb")[0]["error"]
    assert errors_of("cmyk") == [] and errors_of("nocaption") == []
    duplicate_rows = [r["row"] for r in index if r["key"] == index[0]["key"]]
    assert len(duplicate_rows) == 2
    # The later occurrence of a key is no sample: it gets no target row, and one failure before any teacher ran.
    (duplicate,) = by_sample[duplicate_rows[1]]
    assert (duplicate["teacher"], duplicate["row"], index[duplicate_rows[1]]["target_row"]) == ("", -1, -1)
    assert "duplicate key" in duplicate["error"]
    truncated = [e for e in errors if e["sample"] == -1]
    assert len(truncated) == 1 and "truncated" in truncated[0]["error"] and truncated[0]["shard"] == "bad-00001.tar"
    assert summary.failures == 4 * len(TEACHERS)

    caption = {r["key"]: r["caption_present"] for r in index}
    assert caption["nocaption"] is False and caption["cmyk"] is True
    clean_index = pq.read_table(demo_store / "index.parquet").to_pylist()
    clean_rows = {(r["key"], r["image_sha1"]): r["target_row"] for r in clean_index}
    for name in TEACHERS:
        valid = zarr.open_array(str(store / name / "valid"))[:]
        target = zarr.open_array(str(store / name / "target"))
        clean = zarr.open_array(str(demo_store / name / "target"))
        bad_rows = {e["row"] for e in errors if e["teacher"] == name}
        for row in (r for r in index if r["target_row"] >= 0):
            assert valid[row["target_row"]] == (row["target_row"] not in bad_rows), (name, row["key"])
            clean_row = clean_rows.get((row["key"], row["image_sha1"]))
            if clean_row is not None and row["target_row"] not in bad_rows:
                np.testing.assert_array_equal(target[row["target_row"]], clean[clean_row])


# ---- refusals and reuse ---------------------------------------------------------------------------------


def write_manifest(path: Path, demo_dir: Path, names=TEACHERS, overrides: dict | None = None) -> Path:
    import yaml

    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    manifest["teachers"] = {k: v for k, v in manifest["teachers"].items() if k in names}
    for name, spec in (overrides or {}).items():
        manifest["teachers"][name].update(spec)
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_changed_teacher_weights_are_refused_naming_the_teacher(demo_dir, store_copy, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    changed = tmp_path / "depth"
    shutil.copytree(demo_dir / "assets" / "teachers" / "depth", changed)
    weights = load_file(changed / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    manifest = write_manifest(tmp_path / "m.yaml", demo_dir, overrides={"depth": {"model": str(changed)}})
    with pytest.raises(UsageError, match=r"teacher 'depth'.*weights differ"):
        run_precompute(str(demo_dir / "shards"), str(manifest), str(store_copy), progress=False)


def test_adding_a_teacher_computes_only_it_and_leaves_the_others_untouched(demo_dir, ray_local, tmp_path):
    store = tmp_path / "store"
    shards = str(demo_dir / "shards")
    two = write_manifest(tmp_path / "two.yaml", demo_dir, names=("depth", "gen"))
    run_precompute(shards, str(two), str(store), PrecomputeConfig(**DEMO_BLOCKS), progress=False)
    before = {p: p.read_bytes() for p in (store / "depth").rglob("*") if p.is_file()}
    before.update({p: p.read_bytes() for p in (store / "gen").rglob("*") if p.is_file()})
    summary = run_precompute(shards, str(DEMO_TEACHERS), str(store),
                             PrecomputeConfig(**DEMO_BLOCKS), progress=False)
    assert summary.rows_computed == 40  # seg's rows only
    assert {p: p.read_bytes() for p in before} == before
    assert zarr.open_group(str(store))["seg"].attrs["complete"] is True


def test_complete_teachers_carry_channel_mean_and_std(demo_store):
    root = zarr.open_group(str(demo_store), mode="r")
    for name in TEACHERS:
        attrs = root[name].attrs
        target = np.asarray(root[name]["target"][:], dtype=np.float64).reshape(-1, attrs["target_shape"][1])
        np.testing.assert_allclose(attrs["mean"], target.mean(axis=0), atol=2e-3)
        np.testing.assert_allclose(attrs["std"], target.std(axis=0), atol=2e-3, rtol=1e-2)


# ---- stop signals ---------------------------------------------------------------------------------------------
# SIGTERM is what Kubernetes, Slurm and `ray job stop` send, SIGINT what Ctrl-C sends. Sent by the driver itself at
# a phase (a failpoint), or by another process while the driver waits on its workers.
SIGNALS = [("store-created", signal.SIGTERM), ("ray-started", signal.SIGINT), ("finish", signal.SIGTERM),
           ("from outside, mid-run", signal.SIGTERM), ("from outside, mid-run", signal.SIGINT)]


@pytest.mark.parametrize("phase, signum", SIGNALS)
def test_a_stop_signal_at_each_phase_stops_the_workers_frees_the_lock_and_the_rerun_gives_the_same_store(
        phase, signum, demo_dir, small_block_store, ray_local, tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", str(demo_dir / "shards"),
               "--teachers", str(DEMO_TEACHERS), "--store", str(store), "--quiet", *small_block_flags()]
    env = dict(os.environ)
    if not phase.startswith("from outside"):
        env["PIPELINE_KILL_AT"] = f"{phase}:{signal.Signals(signum).name.removeprefix('SIG')}"
    job = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        if phase.startswith("from outside"):
            wait_for_records(store, at_least=2)
            job.send_signal(signum)
        _, stderr = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signum, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by ") and last.endswith("rerun the same command to resume"), stderr[-2000:]
    assert not (store / "_lock").exists(), "the lock outlived the stopped run"
    # The driver's local Ray and its workers share the job's process group: all gone with the driver.
    deadline = time.monotonic() + 15
    while (left := [p for p in psutil.process_iter() if _process_group(p) == job.pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes of the stopped run are still alive: {left}"

    run_precompute(str(demo_dir / "shards"), str(DEMO_TEACHERS), str(store), PrecomputeConfig(**SMALL_BLOCKS),
                   progress=False)
    assert verify_store(str(store), shards=str(demo_dir / "shards"), manifest=str(DEMO_TEACHERS)).problems == []
    assert store_files(store) == store_files(small_block_store)


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:  # gone since it was listed
        return ""


def _process_group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


# A command whose driver waits inside Ray when the SIGTERM comes, as precompute's waits on its workers: Ray turns an
# exception raised by a signal handler inside ray.get into a plain KeyboardInterrupt.
SIGTERM_INSIDE_RAY = """
import os, signal, sys, threading, time
from pipeline import cli
from pipeline.local_ray import ray_session

def forever():
    time.sleep(120)

def wait_inside_ray(args):
    with ray_session(None, num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False) as ray:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        ray.get(ray.remote(forever).remote())

cli._cmd_status = wait_inside_ray
sys.exit(cli.main(["status", "unused"]))
"""


def test_a_sigterm_while_the_driver_waits_inside_ray_is_reported_as_sigterm():
    done = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_RAY], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "interrupted by SIGTERM: stopped; rerun the same command to resume"
