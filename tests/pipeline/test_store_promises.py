"""The store's promises under adversarial use (issue 11): each test is named after the item it proves.

Real shards, real local Ray, real Zarr stores, real processes holding real locks; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zarr

from pipeline.cli import main as cli
from pipeline.data.errors import UsageError
from pipeline.block_stages import block_rows, first_samples
from pipeline.data.loader import TrainingSamples
from pipeline.precompute import BlockWorker
from pipeline.data.store import TargetStore
from pipeline.data.store_lock import FencedOut
from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, REPO, precompute

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEACHERS = ("depth", "seg", "gen")


def store_files(store: Path) -> dict[str, bytes]:
    """What 'the same store' means: every file but run summaries and the lock, records without their timings."""
    files = {}
    for path in sorted(store.rglob("*")):
        relative = str(path.relative_to(store))
        if not path.is_file() or relative.startswith("_runs") or relative == "_lock":
            continue
        data = path.read_bytes()
        if relative.startswith("_blocks"):
            record = json.loads(data)
            record.pop("seconds")
            data = json.dumps(record, sort_keys=True).encode()
        files[relative] = data
    return files


def manifest_with(tmp_path: Path, name: str = "m.yaml", rename: dict | None = None, **changes) -> Path:
    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    teachers = manifest["teachers"]
    for teacher, spec in changes.items():
        teachers[teacher].update(spec)
    for old, new in (rename or {}).items():
        teachers[new] = teachers.pop(old)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- 1. teacher names that collide with the store's own entries ------------------------------------------------


@pytest.mark.parametrize("name", ["_blocks", "_runs", "_lock", "index.parquet", "errors.parquet", "zarr.json",
                                  "_anything"])
def test_a_teacher_named_like_a_store_entry_is_refused_before_anything_is_written(
        name, demo_dir, store_copy, tmp_path, capsys):
    before = store_files(store_copy)
    manifest = manifest_with(tmp_path, rename={"gen": name})
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers", str(manifest),
                           "--store", str(store_copy), "--quiet")
    assert code == 2
    assert "reserved for the store's own files" in err and name in err and len(err.strip().splitlines()) == 1
    assert store_files(store_copy) == before
    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers", str(manifest),
                   "--store", str(fresh), "--quiet")[0] == 2
    assert not fresh.exists()


# ---- 2. a run killed after its last record but before it finished -----------------------------------------------


def test_a_run_killed_after_its_last_record_is_finished_by_the_rerun(demo_dir, demo_store, store_copy):
    # Exactly what a kill -9 between the last block record and the finish leaves: every record, but no
    # errors.parquet, no mean/std and no teacher marked complete.
    (store_copy / "errors.parquet").unlink()
    root = zarr.open_group(str(store_copy), mode="r+")
    for name in TEACHERS:
        attrs = root[name].attrs.asdict()
        root[name].attrs.put({k: v for k, v in attrs.items() if k not in ("mean", "std", "stats_count")}
                             | {"complete": False})
    assert verify_store(str(store_copy)).problems  # unfinished: verify says so

    summary = precompute(demo_dir / "shards", store_copy)
    assert summary.blocks_computed == 0 and summary.finished_earlier_run and not summary.nothing_to_do
    assert verify_store(str(store_copy), shards=str(demo_dir / "shards")).problems == []
    assert store_files(store_copy) == store_files(demo_store)
    assert precompute(demo_dir / "shards", store_copy).nothing_to_do


# ---- 4. the lock: atomic, released only by its holder, fencing a dead run's workers -----------------------------

RACER = textwrap.dedent("""
    import sys, time
    from pipeline.data.errors import UsageError
    from pipeline.data.store import TargetStore
    trials, start, window = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    held = {}
    for trial in range(trials):
        time.sleep(max(0.0, start + trial * window - time.time()))
        lock = TargetStore(f"{sys.argv[1]}/trial-{trial}").lock()
        try:
            lock.__enter__()
        except UsageError:
            continue
        held[trial] = lock
    # Every lock won is held until all racers are done, so two winners of one trial would be two holders at once.
    time.sleep(max(0.0, start + trials * window + 3.0 - time.time()))
    for lock in held.values():
        lock.__exit__(None, None, None)
    print(" ".join(map(str, held)))
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.data.store import TargetStore
    lock = TargetStore(sys.argv[1]).lock()
    lock.__enter__()
    print(lock.token, flush=True)
    time.sleep(120)
""")


def test_racing_runs_on_a_new_store_get_the_lock_exactly_once(tmp_path):
    trials, racers, window = 40, 4, 0.1
    start = time.time() + 4.0  # every racer has imported the package by then
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(trials), str(start), str(window)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(racers)]
    wins = [int(t) for p in procs for t in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(wins) == list(range(trials)), "each trial must have exactly one winner"
    assert not any((tmp_path / f"trial-{t}" / "_lock").exists() for t in range(trials))


def test_a_refused_run_leaves_the_holders_lock_and_kill_9_frees_it(demo_dir, store_copy):
    (store_copy / "_blocks" / "gen" / "000000.json").unlink()  # give a run something to do
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store_copy)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        token = holder.stdout.readline().strip()
        with pytest.raises(UsageError, match=rf"being written by another precompute \(host .*pid {holder.pid}"):
            precompute(demo_dir / "shards", store_copy)
        assert json.loads((store_copy / "_lock").read_text())["token"] == token, "the refused run removed the lock"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock: the next run takes it at once, with no staleness to wait for.
    summary = precompute(demo_dir / "shards", store_copy)
    assert summary.blocks_computed == 1
    assert not (store_copy / "_lock").exists()


def test_a_worker_of_a_dead_run_cannot_write_into_a_store_another_run_holds(demo_dir, store_copy, ray_local):
    store = TargetStore(str(store_copy))
    with store.lock() as dead_run:  # a run that held the store, then died
        stale_token = dead_run.token
    spec = yaml.safe_load(DEMO_TEACHERS.read_text())["teachers"]["gen"]
    spec["model"] = str(demo_dir / "assets" / "teachers" / "gen")
    urls = {p.name: str(p) for p in sorted((demo_dir / "shards").glob("*.tar"))}
    # This process's own thread count: the worker sets torch's threads for its whole process. (Setting them at all
    # also turns MKL's dynamic threading off for good, which moves float bits: the trainer sets its own threads.)
    worker = BlockWorker(str(store_copy), {"gen": spec}, urls, max_pixels=10**8, threads=torch.get_num_threads(),
                         token=stale_token)
    (store_copy / "_blocks" / "gen" / "000000.json").unlink()
    index = store.read_index()
    (block,) = block_rows(first_samples(index), store.blocks()[:1])
    with store.lock():  # another run holds the store now
        before = store_files(store_copy)
        with pytest.raises(FencedOut, match="no longer holds the store lock"):
            worker.process(block, ["gen"])
        assert store_files(store_copy) == before
    # With no run holding the store, the dead run's worker is still kept out.
    with pytest.raises(FencedOut):
        worker.process(block, ["gen"])
    assert store_files(store_copy) == before


# ---- 5. a tar cut inside a member header -------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def demo_samples(demo_dir: Path, count: int) -> list[tuple[str, bytes, bytes]]:
    """(key, jpeg bytes, caption bytes) of the first demo samples."""
    with tarfile.open(sorted((demo_dir / "shards").glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(name[:-4] for name in members if name.endswith(".jpg"))[:count]
    return [(k, members[f"{k}.jpg"], members[f"{k}.txt"]) for k in keys]


def test_a_tar_cut_inside_a_member_header_is_recorded(demo_dir, ray_local, tmp_path):
    samples = demo_samples(demo_dir, 6)
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in samples:
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", txt)
    data = whole.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        fourth = next(m for m in tar.getmembers() if m.name == f"{samples[3][0]}.jpg")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "cut-00000.tar").write_bytes(data[: fourth.offset + 200])  # inside the 4th sample's first header

    store = tmp_path / "store"
    summary = precompute(shards, store, rows_per_block=4, rows_per_chunk=2)
    index = pq.read_table(store / "index.parquet").column("key").to_pylist()
    assert index == [key for key, _, _ in samples[:3]]
    errors = pq.read_table(store / "errors.parquet").to_pylist()
    assert [(e["row"], e["shard"], e["key"]) for e in errors] == [(-1, "cut-00000.tar", samples[3][0])]
    assert "header" in errors[0]["error"] and "3 whole samples" in errors[0]["error"]
    assert summary.failures == 0 and verify_store(str(store)).problems == []


# ---- 6. every column of index.parquet is covered -----------------------------------------------------------------


def edit_index(store: Path, column: str, row: int, value) -> None:
    table = pq.read_table(store / "index.parquet")
    values = table.column(column).to_pylist()
    values[row] = value
    position = table.column_names.index(column)
    table = table.set_column(position, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, store / "index.parquet")


@pytest.mark.parametrize("column, value", [("image_offset", 512), ("image_size", 99), ("caption_present", False),
                                           ("key", "renamed")])
def test_an_edited_index_column_is_caught_by_verify_precompute_and_training(
        column, value, demo_dir, store_copy, capsys):
    edit_index(store_copy, column, 3, value)
    code, out, _ = run_cli(capsys, "verify", str(store_copy), "--quiet")
    assert code == 1 and "index.parquet differs from the index this store was made with" in out
    (store_copy / "_blocks" / "gen" / "000000.json").unlink()  # so precompute has work to refuse
    with pytest.raises(UsageError, match="index.parquet differs"):
        precompute(demo_dir / "shards", store_copy)
    with pytest.raises(UsageError, match="index.parquet differs"):
        TrainingSamples(str(demo_dir / "shards"), str(store_copy), ["depth"], transform=lambda s: s)


def test_shards_whose_layout_changed_are_refused_naming_the_column(demo_dir, store_copy, tmp_path):
    # The same samples, bytes and order, re-tarred with an extended (pax) header before each member: the
    # dataset fingerprint holds, but every offset moves.
    shards = tmp_path / "shards"
    shutil.copytree(demo_dir / "shards", shards)
    first = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(data), 0, {"comment": "re-tarred"}
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UsageError,
                       match=r"built for other shards: its shard demo-00000.tar differs .*\(row 0 .*image_offset"):
        precompute(shards, store_copy)


# ---- 7. duplicate keys: one rule for precompute and training -----------------------------------------------------


def test_a_duplicate_key_is_the_first_occurrence_in_precompute_and_in_training(demo_dir, ray_local, tmp_path):
    (a, a_jpg, a_txt), (b, b_jpg, b_txt), (_, c_jpg, _) = demo_samples(demo_dir, 3)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "dup-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in [(a, a_jpg, a_txt), (b, b_jpg, b_txt), (a, c_jpg, b"the same key, another image")]:
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", txt)
    store = tmp_path / "store"
    precompute(shards, store, rows_per_block=4, rows_per_chunk=2)
    (error,) = pq.read_table(store / "errors.parquet").to_pylist()  # recorded once, before any teacher ran
    assert (error["sample"], error["row"], error["teacher"]) == (2, -1, "") and "duplicate key" in error["error"]
    assert pq.read_table(store / "index.parquet").column("target_row").to_pylist() == [0, 1, -1]
    valid = zarr.open_group(str(store), mode="r")["depth"]["valid"][:]
    assert valid.tolist() == [1, 1]  # no target row, and no forward, for the later occurrence
    depth = TargetStore(str(store)).read_rows("depth", 0, 1)[0][0]

    for check_hash in (True, False):
        samples = TrainingSamples(str(shards), str(store), ["depth"], transform=lambda s: s,
                                  check_image_hash=check_hash)
        delivered = list(samples)
        assert [(s.key, s.row) for s in delivered] == [(a, 0), (b, 1)]
        first = delivered[0]
        assert first.valid["depth"] and np.array_equal(first.targets["depth"], depth)
        assert samples.excluded == {"duplicate key in its shard (only the first occurrence is used)": 1}


# ---- 8. batch size: recorded per block, mixed sizes reported -----------------------------------------------------


def test_blocks_record_their_batch_size_and_verify_reports_mixed_sizes(demo_dir, store_copy, capsys):
    records = store_copy / "_blocks" / "depth"
    assert {json.loads(p.read_text())["batch_size"] for p in records.glob("*.json")} == {8}
    (records / "000001.json").unlink()
    precompute(demo_dir / "shards", store_copy, batch_size=3)
    assert json.loads((records / "000001.json").read_text())["batch_size"] == 3
    code, out, _ = run_cli(capsys, "verify", str(store_copy), "--quiet")
    assert code == 0, out
    assert "note: depth: blocks were computed with different batch sizes (3: 1 block(s), 8: 2 block(s))" in out
    assert "byte-identical only with equal batch sizes" in out


# ---- 10. bad input: exit 2, one line naming the field, nothing left behind ----------------------------------------


def test_a_store_path_that_is_a_file_or_a_foreign_directory_is_exit_2(demo_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers",
                           str(DEMO_TEACHERS), "--store", str(a_file), "--quiet")
    assert code == 2 and "--store" in err and "is a file" in err and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "mine"
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers",
                           str(DEMO_TEACHERS), "--store", str(demo_dir / "shards"), "--quiet")
    assert code == 2 and "not a target store" in err
    assert not (demo_dir / "shards" / "zarr.json").exists() and not (demo_dir / "shards" / "_lock").exists()


def test_a_missing_model_directory_is_exit_2_naming_the_teacher(demo_dir, tmp_path, capsys):
    manifest = manifest_with(tmp_path, depth={"model": str(tmp_path / "no-such-model")})
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers", str(manifest),
                           "--store", str(store), "--quiet")
    assert code == 2 and "teachers.depth.model: no such directory" in err and len(err.strip().splitlines()) == 1
    assert not store.exists()


@pytest.mark.parametrize("flag, value", [("--rows-per-block", "0"), ("--rows-per-chunk", "0"),
                                         ("--batch-size", "0"), ("--workers", "0"), ("--max-pixels", "-1"),
                                         ("--rows-per-chunk", "5")])
def test_bad_run_settings_are_exit_2_naming_the_flag_and_leave_no_store(flag, value, demo_dir, tmp_path,
                                                                               capsys):
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers",
                           str(DEMO_TEACHERS), "--store", str(store), "--rows-per-block", "16", flag, value, "--quiet")
    assert code == 2 and err.startswith(f"error: {flag}:") and len(err.strip().splitlines()) == 1
    assert not store.exists()


@pytest.mark.parametrize("command", ["verify", "status"])
def test_verify_and_status_on_a_directory_that_is_not_a_store_are_exit_2(command, demo_dir, capsys):
    code, _, err = run_cli(capsys, command, str(demo_dir / "shards"))
    assert code == 2 and "is not a target store" in err and len(err.strip().splitlines()) == 1


def test_a_rerun_on_a_store_with_other_blocks_refuses_bad_chunking_before_starting_workers(
        demo_dir, store_copy, tmp_path, capsys):
    manifest = manifest_with(tmp_path, rename={"gen": "gen2"})
    code, _, err = run_cli(capsys, "precompute", "--shards", str(demo_dir / "shards"), "--teachers", str(manifest),
                           "--store", str(store_copy), "--rows-per-chunk", "5", "--rows-per-block", "5", "--quiet")
    assert code == 2 and "--rows-per-chunk 5 must divide the store's rows_per_block 16" in err
    assert not (store_copy / "gen2").exists() and not (store_copy / "_lock").exists()


def test_a_write_killed_before_its_rename_leaves_nothing_after_the_rerun(demo_dir, demo_store, store_copy):
    # What a kill -9 between writing a record's temporary file and renaming it leaves behind.
    (store_copy / "_blocks" / "gen" / "000001.json").unlink()
    (store_copy / "_blocks" / "gen" / "000001.json.tmp-4242").write_text('{"half": ')
    precompute(demo_dir / "shards", store_copy)
    assert store_files(store_copy) == store_files(demo_store)
