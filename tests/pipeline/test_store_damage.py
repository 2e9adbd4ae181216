"""A damaged store and hostile samples: the tools name the damage in one line, and a rerun repairs what it can.

Real stores (copies of the session's demo store) damaged by hand, real shards, the real CLI, real local Ray for
the reruns. The partial files are made by zarr-python's own atomic write, interrupted as a kill would.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml
from zarr.storage._local import _atomic_write

from pipeline.cli import main as cli
from pipeline.data.errors import UsageError
from pipeline.data.index import build_index
from pipeline.data.store import BlockRecord, DamagedRecord, TargetStore
from pipeline.data.store_lock import StoreLock
from pipeline.precompute import open_or_create_store
from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, ROWS_PER_BLOCK, ROWS_PER_CHUNK, precompute
from tests.pipeline.test_store_promises import store_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def killed_zarr_write(path: Path, size: int = 2 * 2**20) -> Path:
    """What zarr-python's LocalStore leaves when its process dies inside a write of `path`: the temporary file it
    writes before renaming it into place (an exception that is not an Exception skips its clean-up, as a kill does)."""
    before = set(path.parent.iterdir()) if path.parent.exists() else set()
    path.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(KeyboardInterrupt), _atomic_write(path, "wb") as f:
        f.write(b"\x01" * size)
        raise KeyboardInterrupt
    (partial,) = set(path.parent.iterdir()) - before
    return partial


# ---- hostile samples at indexing ---------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


NESTED = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError


def hostile_shards(demo_dir: Path, root: Path) -> Path:
    """One shard of three demo images: a captioned one, one with a caption and a KEY.json nested 100000 deep, and
    one with a conversation."""
    with tarfile.open(sorted((demo_dir / "shards").glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    jpgs = sorted(name for name in members if name.endswith(".jpg"))[:3]
    conversation = json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "A photo."}]}).encode()
    shards = root / "shards"
    shards.mkdir()
    with tarfile.open(shards / "hostile-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, extra in zip(("a", "b", "c"), ({"txt": b"a photo"}, {"txt": b"a photo", "json": NESTED},
                                               {"json": conversation})):
            _add(tar, f"{key}.jpg", members[jpgs["abc".index(key)]])
            for ext, data in extra.items():
                _add(tar, f"{key}.{ext}", data)
    return shards


def gen_only_manifest(root: Path) -> Path:
    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    manifest["teachers"] = {"gen": manifest["teachers"]["gen"]}
    path = root / "gen.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def test_a_sample_whose_json_is_nested_too_deep_is_indexed_with_its_failure_recorded(demo_dir, tmp_path, capsys):
    shards = hostile_shards(demo_dir, tmp_path)
    code, out, err = run_cli(capsys, "index", shards, "--out", tmp_path / "index.parquet", "--quiet")
    assert code == 0, err
    assert "3 samples" in out
    assert "sample b" in err and "RecursionError" in err and "indexed without a conversation" in err
    rows = pq.read_table(tmp_path / "index.parquet").select(["key", "caption_present", "has_conversation"])
    assert rows.to_pylist() == [{"key": "a", "caption_present": True, "has_conversation": False},
                                {"key": "b", "caption_present": True, "has_conversation": False},
                                {"key": "c", "caption_present": True, "has_conversation": True}]


def test_an_indexing_failure_reaches_errors_parquet_and_a_rerun_keeps_it(demo_dir, ray_local, tmp_path):
    shards, manifest, store = hostile_shards(demo_dir, tmp_path), gen_only_manifest(tmp_path), tmp_path / "store"
    summary = precompute(shards, store, manifest)
    assert summary.rows_computed == 3 and summary.failures == 0  # the image of b is fine: its targets are computed
    (error,) = pq.read_table(store / "errors.parquet").to_pylist()
    # Sample 1's text, not a target: no target row is named.
    assert (error["sample"], error["row"], error["shard"], error["key"], error["teacher"]) == (
        1, -1, "hostile-00000.tar", "b", "")
    assert "RecursionError" in error["error"]
    assert verify_store(str(store), shards=str(shards)).problems == []

    # A rerun takes the shard's rows from the store without reading it again, and its failure with them.
    previous = TargetStore(str(store)).previous_index()
    reused = build_index(str(shards), previous=previous, progress=False)
    assert reused.scanned == [] and reused.shard_errors == build_index(str(shards), progress=False).shard_errors
    errors = (store / "errors.parquet").read_bytes()
    (store / "_blocks" / "gen" / "000000.json").unlink()
    assert precompute(shards, store, manifest).blocks_computed == 1
    assert (store / "errors.parquet").read_bytes() == errors


def test_a_store_whose_zarr_json_lost_its_index_digest_is_named_by_verify(store_copy):
    metadata = json.loads((store_copy / "zarr.json").read_text())
    del metadata["attributes"]["index_sha256"]
    (store_copy / "zarr.json").write_text(json.dumps(metadata))
    problems = verify_store(str(store_copy)).problems
    assert any("records no index_sha256" in p for p in problems), problems


def test_shard_records_missing_a_column_are_named_by_verify_and_rewritten_by_a_rerun(demo_dir, ray_local,
                                                                                      store_copy):
    table = pq.read_table(store_copy / "shards.parquet")
    pq.write_table(table.drop_columns(["sample_errors"]), store_copy / "shards.parquet")
    problems = verify_store(str(store_copy), shards=str(demo_dir / "shards")).problems
    assert any("shards.parquet has columns" in p and "sample_errors" in p for p in problems), problems
    (store_copy / "_blocks" / "gen" / "000000.json").unlink()  # a rerun with work writes the records anew
    assert precompute(demo_dir / "shards", store_copy).blocks_computed == 1
    assert pq.read_table(store_copy / "shards.parquet").equals(table)
    assert verify_store(str(store_copy), shards=str(demo_dir / "shards")).problems == []


# ---- partial files of killed writes, and files that do not belong --------------------------------------------------


def test_a_write_killed_inside_zarr_is_named_by_verify_and_removed_by_the_rerun(demo_dir, demo_store, store_copy,
                                                                              capsys):
    """kill -9 while block 1 of seg was written: zarr's temporary shard file (2 MB) and no record; our own record
    write killed too."""
    (store_copy / "_blocks" / "seg" / "000001.json").unlink()
    partial = killed_zarr_write(store_copy / "seg" / "target" / "c" / "1" / "0" / "0")
    ours = store_copy / "_blocks" / "seg" / "000001.json.tmp-99999"
    ours.write_bytes(b'{"blo')

    code, out, _ = run_cli(capsys, "verify", store_copy, "--quiet")
    assert code == 1
    for leftover in (partial, ours):
        assert f"problem: {leftover} is the unfinished file of a write that was killed" in out

    assert precompute(demo_dir / "shards", store_copy).blocks_computed == 1
    assert not partial.exists() and not ours.exists()
    assert store_files(store_copy) == store_files(demo_store)
    assert run_cli(capsys, "verify", store_copy, "--quiet")[0] == 0


def test_a_first_run_killed_while_writing_the_store_group_is_made_again(demo_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "_lock").write_bytes(b"")
    partial = killed_zarr_write(store / "zarr.json", size=100)
    TargetStore(str(store)).check_location()  # only what a killed run leaves: not "a directory holding other things"
    index = build_index(str(demo_dir / "shards"), progress=False)
    with TargetStore(str(store)).lock():
        open_or_create_store(str(store), index, ROWS_PER_BLOCK)
    assert not partial.exists()
    assert sorted(p.name for p in store.iterdir()) == ["index.parquet", "shards.parquet", "zarr.json"]


def test_verify_names_every_file_that_is_not_part_of_the_store(store_copy, capsys):
    strays = ["notes.txt", "seg/target/c/7/0/0", "seg/extra.bin", "_blocks/seg/1.json", "_runs/old.log"]
    for stray in strays:
        (store_copy / stray).parent.mkdir(parents=True, exist_ok=True)
        (store_copy / stray).write_bytes(b"x")
    for folder in ("backup", "_blocks/ghost"):  # a folder of which nothing belongs is named once
        (store_copy / folder).mkdir()
        for name in ("000000.json", "000001.json"):
            (store_copy / folder / name).write_bytes(b"{}")
    code, out, _ = run_cli(capsys, "verify", store_copy, "--quiet")
    assert code == 1
    named = [line for line in out.splitlines() if "is not part of the store's format" in line]
    assert sorted(named) == sorted(f"problem: {store_copy}/{path} is not part of the store's format; move it out of "
                                   "the store" for path in [*strays, "backup/", "_blocks/ghost/"])


# ---- store paths that name no directory --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "//", "file:///", "/tmp/.."])
def test_the_filesystem_root_is_refused_as_a_store_never_the_current_directory(demo_dir, tmp_path, monkeypatch,
                                                                               capsys, path):
    monkeypatch.chdir(tmp_path)
    for argv in (["status", path], ["verify", path, "--quiet"],
                 ["precompute", "--shards", demo_dir / "shards", "--teachers", DEMO_TEACHERS, "--store", path,
                  "--quiet"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert err == f"error: refusing to use {path} as a store: it is the filesystem root /; pass a directory " \
                      "below it\n"
    assert list(tmp_path.iterdir()) == []


def test_an_empty_store_path_is_refused_never_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "status", "")
    assert code == 2 and "names no directory" in err
    assert list(tmp_path.iterdir()) == []


# ---- damaged files ----------------------------------------------------------------------------------------------


DAMAGED_RECORDS = {
    "garbage": lambda record: b"\x00\xffnot json{",
    "fields missing": lambda record: json.dumps({"block": record["block"], "rows": record["rows"]}).encode(),
    "another block's": lambda record: json.dumps({**record, "block": 0, "start": 0}).encode(),
    "failures not a list": lambda record: json.dumps({**record, "failures": {"row": 3}}).encode(),
}


def test_a_sound_block_record_reads_back_byte_for_byte_and_crosses_processes(demo_store):
    store = TargetStore(str(demo_store))
    for name in store.teacher_names():
        records = store.read_records(name)
        assert [r.block for r in records] == [b.block for b in store.blocks()]
        for record in records:
            assert record.to_json() == (demo_store / "_blocks" / name / f"{record.block:06d}.json").read_bytes()
            assert pickle.loads(pickle.dumps(record)) == record  # Ray hands a worker's records to the driver


def test_a_block_record_missing_any_field_is_damaged_naming_the_field(demo_store):
    store = TargetStore(str(demo_store))
    block = store.blocks()[1]
    fields = json.loads(store.read_records("seg")[1].to_json())
    channels = store.teacher_attrs("seg")["target_shape"][1]
    for key in fields:
        data = json.dumps({k: v for k, v in fields.items() if k != key}).encode()
        with pytest.raises(DamagedRecord, match=f"^{key} is "):
            BlockRecord.from_json(data, "seg", block, channels)


@pytest.mark.parametrize("damage", sorted(DAMAGED_RECORDS))
def test_a_damaged_block_record_is_named_and_its_block_computed_again(demo_dir, demo_store, store_copy, capsys,
                                                                      damage):
    path = store_copy / "_blocks" / "seg" / "000001.json"
    path.write_bytes(DAMAGED_RECORDS[damage](json.loads(path.read_text())))
    problem = f"{path} is not a sound completion record ("

    code, out, err = run_cli(capsys, "status", store_copy)
    assert code == 0, err
    assert "seg      24/40 rows (2/3 blocks" in out and f"    problem: {problem}" in out
    code, out, _ = run_cli(capsys, "verify", store_copy, "--quiet")
    assert code == 1 and f"problem: {problem}" in out

    assert precompute(demo_dir / "shards", store_copy).blocks_computed == 1
    assert store_files(store_copy) == store_files(demo_store)
    assert verify_store(str(store_copy)).problems == []


def test_a_damaged_teacher_group_file_is_one_line_saying_what_to_do(demo_dir, demo_store, store_copy, capsys):
    (store_copy / "seg" / "zarr.json").write_bytes(b"\x00garbage")
    expected = (f"error: store {store_copy}: {store_copy}/seg/zarr.json is not valid JSON (damaged); delete the "
                f"teacher's folder {store_copy}/seg and rerun `pipeline precompute` to compute teacher seg again\n")
    for argv in (["status", store_copy], ["verify", store_copy, "--quiet"],
                 ["precompute", "--shards", demo_dir / "shards", "--teachers", DEMO_TEACHERS, "--store", store_copy,
                  "--rows-per-block", ROWS_PER_BLOCK, "--rows-per-chunk", ROWS_PER_CHUNK, "--quiet"]):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out, err) == (2, "", expected)

    shutil.rmtree(store_copy / "seg")  # what the message says to do
    assert precompute(demo_dir / "shards", store_copy).blocks_computed == 3
    assert store_files(store_copy) == store_files(demo_store)


def test_a_damaged_errors_parquet_is_a_problem_for_verify_and_one_line_in_status(store_copy, capsys):
    (store_copy / "errors.parquet").write_bytes(b"PAR1 garbage")
    problem = f"store {store_copy}: {store_copy}/errors.parquet is not a readable parquet file (damaged"
    code, out, _ = run_cli(capsys, "verify", store_copy, "--quiet")
    assert code == 1 and f"problem: {problem}" in out
    code, out, err = run_cli(capsys, "status", store_copy)
    assert code == 0 and err == ""
    mentions = [line for line in out.splitlines() if "errors.parquet" in line]
    assert len(mentions) == 1 and mentions[0].startswith(f"  problem: {problem}")


@pytest.mark.parametrize("filename", ["shards.parquet", "index.parquet"])
def test_every_parquet_file_of_the_store_is_read_by_verify(store_copy, filename):
    data = (store_copy / filename).read_bytes()
    (store_copy / filename).write_bytes(data[: len(data) // 2])
    problems = verify_store(str(store_copy)).problems
    assert any(f"{store_copy}/{filename}" in p for p in problems), problems


def test_a_damaged_shards_parquet_makes_a_rerun_read_the_shards_again(demo_dir, ray_local, store_copy):
    (store_copy / "shards.parquet").write_bytes(b"garbage")
    assert precompute(demo_dir / "shards", store_copy).nothing_to_do


def test_a_damaged_run_summary_is_one_line_in_status(store_copy, capsys):
    (run,) = (store_copy / "_runs").iterdir()
    run.write_bytes(b"{")
    code, out, err = run_cli(capsys, "status", store_copy)
    assert code == 0 and err == ""
    assert f"  problem: store {store_copy}: {run} is not a run summary (damaged)" in out


def test_a_lock_file_holding_no_holder_is_refused_in_one_line():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/held-by-garbage/_lock", b"[1, 2]")
    with pytest.raises(UsageError, match="remove /held-by-garbage/_lock if no precompute is running"):
        StoreLock(fs, "/held-by-garbage").__enter__()


def test_a_finished_store_with_leftovers_is_repaired_by_a_rerun(demo_dir, demo_store, store_copy):
    killed = store_copy / "_runs" / "20990101T000000Z-1.json.tmp-4242"  # write_run killed after the finish
    killed.write_bytes(b'{"fini')
    (store_copy / "errors.parquet").write_bytes(b"garbage")
    summary = precompute(demo_dir / "shards", store_copy)
    assert summary.finished_earlier_run and not killed.exists()
    assert store_files(store_copy) == store_files(demo_store)


def test_a_version_1_store_is_refused_in_one_line_that_says_to_recompute_it(store_copy, capsys):
    metadata = json.loads((store_copy / "zarr.json").read_text())
    metadata["attributes"]["format_version"] = 1  # a store of one target row per sample, as version 1 made them
    (store_copy / "zarr.json").write_text(json.dumps(metadata))
    for argv in (["status", str(store_copy)], ["verify", str(store_copy)]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "format version 1" in err and "recompute it with `pipeline precompute` into a new --store" in err
