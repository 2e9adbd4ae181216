"""`pipeline shards llava`: LLaVA JSON + images folder -> img2dataset-layout shards, on real files and real tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.errors import UsageError
from pipeline.data.images import decode_rgb
from pipeline.data.index import build_index
from pipeline.llava_shards import caption_of, failures_path, image_extension, write_llava_shards
from tests.conftest import REPO, kill_left_behind
from tests.pipeline.llava_fixtures import (HOSTILE_LIMIT, HostileSet, LlavaSet, hostile_images, hostile_record,
                                           mix_665k, pretrain_558k)

MIX_PER_SHARD = 8  # 30 records -> 4 shards, the last one short
PRETRAIN_PER_SHARD = 10


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> LlavaSet:
    return mix_665k(tmp_path_factory.mktemp("mix"))


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> LlavaSet:
    return pretrain_558k(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> HostileSet:
    return hostile_images(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def mix_shards(mix, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix_shards")
    return write_llava_shards(mix.json_path, mix.images, out, samples_per_shard=MIX_PER_SHARD, workers=1,
                              progress=False)


def _shard(mix: LlavaSet, out: Path, **options):
    return write_llava_shards(mix.json_path, mix.images, out, samples_per_shard=MIX_PER_SHARD, workers=1,
                              progress=False, **options)


def _samples(paths) -> list[dict]:
    """Every sample of the shards in order: {"shard", "key", ext: bytes, ...}."""
    samples = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not samples or (samples[-1]["shard"], samples[-1]["key"]) != (path.name, key):
                    samples.append({"shard": path.name, "key": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def _digests(paths) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def _image(sample: dict) -> tuple[str, bytes] | None:
    return next(((ext, data) for ext, data in sample.items() if ext not in ("shard", "key", "json", "txt")), None)


def test_every_record_lands_in_exactly_one_shard(mix, mix_shards):
    found = Counter(json.loads(s["json"])["id"] for s in _samples(mix_shards.shards))
    expected = Counter(r["id"] for r in mix.records if r["id"] not in mix.left_out)
    assert found == expected  # text-only records included, the duplicate id twice
    assert found["2354786"] == 2
    assert mix_shards.duplicate_ids == mix.duplicate_ids == 1
    assert (mix_shards.samples, mix_shards.text_only) == (sum(expected.values()), len(mix.text_only))
    assert [p.name for p in mix_shards.shards] == [f"llava_v1_5_mix665k-{i:05d}.tar" for i in range(4)]


def test_keys_come_from_position_and_are_unique(mix_shards):
    samples = _samples(mix_shards.shards)
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) and keys == sorted(keys)
    for sample in samples:
        shard = int(sample["shard"].rsplit("-", 1)[1].removesuffix(".tar"))
        assert sample["key"][:5] == f"{shard:05d}" and int(sample["key"][5:]) < MIX_PER_SHARD


def test_left_out_records_are_listed_with_their_reason(mix, mix_shards):
    table = pq.read_table(mix_shards.failures_file).to_pylist()
    assert {row["id"]: row["reason"] for row in table} == mix.left_out
    by_id = {r["id"]: (position, r) for position, r in enumerate(mix.records)}
    for row in table:
        position, record = by_id[row["id"]]
        assert (row["record"], row["image"]) == (position, record["image"])
        assert record["image"] in row["detail"]
    assert mix_shards.failures == dict(Counter(mix.left_out.values()))


def test_image_bytes_are_the_source_files(mix, mix_shards):
    with_image = 0
    for sample in _samples(mix_shards.shards):
        record = json.loads(sample["json"])
        found = _image(sample)
        if record["id"] in mix.text_only:
            assert found is None and set(sample) == {"shard", "key", "json"}
            continue
        ext, data = found
        assert data == (mix.images / record["image"]).read_bytes(), record["id"]
        assert ext == image_extension(data)
        with_image += 1
    assert with_image == mix_shards.images == len(mix.records) - len(mix.left_out) - len(mix.text_only)


def test_an_image_whose_extension_lies_is_stored_under_its_real_format(mix, mix_shards):
    (liar,) = mix.lying
    sample = next(s for s in _samples(mix_shards.shards) if json.loads(s["json"])["id"] == liar)
    assert json.loads(sample["json"])["image"].endswith(".jpg")
    assert "png" in sample and "jpg" not in sample
    assert decode_rgb(sample["png"]).mode == "RGB"
    assert mix_shards.lying_extensions == 1


def test_json_member_is_the_record(mix, mix_shards):
    records = {r["id"]: r for r in mix.records}
    for sample in _samples(mix_shards.shards):
        stored = json.loads(sample["json"])
        if stored["id"] != "2354786":  # the duplicate id: either of two records
            assert stored == records[stored["id"]]
        assert list(stored)[:2] == ["id", "image"] or stored["id"] in mix.text_only


def test_captions_are_the_answers_of_single_turn_caption_records(pretrain, tmp_path):
    summary = write_llava_shards(pretrain.json_path, pretrain.images, tmp_path, samples_per_shard=PRETRAIN_PER_SHARD,
                                 workers=1, progress=False)
    samples = _samples(summary.shards)
    assert [len(s) for s in (summary.shards, samples)] == [3, 24] and summary.captions == 24
    for sample in samples:
        record = json.loads(sample["json"])
        assert sample["txt"].decode() == record["conversations"][1]["value"]
        assert sample["jpg"] == (pretrain.images / record["image"]).read_bytes()


@pytest.mark.parametrize("turns, caption", [
    ([("human", "Render a clear and concise summary of the photo.\n<image>"), ("gpt", "a cat")], "a cat"),
    ([("human", "<image>\nWhat is this?"), ("gpt", "a cat")], None),  # a question: VQA, not a caption
    ([("human", "<image>\nwhat is it?\nAnswer the question using a single word or phrase."), ("gpt", "cat")], None),
    ([("human", "<image>\nDescribe it."), ("gpt", "a cat"), ("human", "Colour?"), ("gpt", "ginger")], None),
    ([("human", "Describe a cat."), ("gpt", "a cat")], None),  # no <image> in the instruction
])
def test_caption_rule(turns, caption):
    record = {"id": "1", "image": "a.jpg", "conversations": [{"from": f, "value": v} for f, v in turns]}
    assert caption_of(record) == caption
    assert caption_of({**record, "caption": " its own "}) == "its own"
    assert caption_of({k: v for k, v in record.items() if k != "image"}) is None


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"),
                                      ("BMP", "bmp"), ("TIFF", "tiff")])
def test_image_format_is_read_from_content(fmt, ext):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format=fmt)
    assert image_extension(buffer.getvalue()) == ext
    assert image_extension(b"BM not a bitmap header at all") is None


def test_shards_are_readable_by_the_index(mix, mix_shards):
    index = build_index(str(mix_shards.out), progress=False)
    rows = index.table.to_pylist()
    assert len(rows) == mix_shards.samples and not index.shard_errors
    samples = {(s["shard"], s["key"]): json.loads(s["json"])["id"] for s in _samples(mix_shards.shards)}
    for row in rows:
        text_only = samples[(row["shard"], row["key"])] in mix.text_only
        assert (row["image_sha1"] == "") == text_only
        assert row["caption_present"]  # every sample carries a conversation


def _repeating(pretrain: LlavaSet, root: Path) -> Path:
    """A LLaVA JSON over `pretrain`'s images whose 9 image records hold 4 distinct images: 4 repeat an earlier
    record's path, 1 names a byte-identical copy of an earlier image under another name. Plus a text-only record."""
    first, seen = [], set()
    for record in pretrain.records:  # the demo photographs repeat some (skimage's cat is chelsea)
        data = (pretrain.images / record["image"]).read_bytes()
        if data not in seen and len(first) < 4:
            first.append(record)
            seen.add(data)
    images = shutil.copytree(pretrain.images, root / "images")
    (images / "copies").mkdir()
    shutil.copy(images / first[2]["image"], images / "copies" / "two.jpg")
    again = [{**first[i], "id": f"again {n}"} for n, i in enumerate((0, 1, 0))]
    copy = {**first[2], "id": "copy", "image": "copies/two.jpg"}
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = root / "repeating.json"
    path.write_text(json.dumps([*first[:2], again[0], *first[2:], copy, text, again[1], {**copy, "id": "copy 2"},
                                again[2]]))
    return path


def test_the_summary_counts_images_repeated_by_path_and_by_copied_content(pretrain, tmp_path):
    json_path = _repeating(pretrain, tmp_path)
    summary = write_llava_shards(json_path, tmp_path / "images", tmp_path / "out", samples_per_shard=3, workers=1,
                                 progress=False)
    assert (summary.images, summary.text_only, len(summary.shards)) == (9, 1, 4)
    assert (summary.distinct_images, summary.repeats_by_path, summary.repeats_by_content) == (4, 4, 1)
    assert ("repeated images: 5 of 9 image sample(s) repeat an earlier one (4 by the same path, 1 byte-identical "
            "under another path): 4 distinct image(s)") in summary.report()
    # Counted, never merged: every sample keeps its own copy of the bytes, and the index sees the same contents.
    samples = _samples(summary.shards)
    assert sum(_image(s) is not None for s in samples) == 9
    sha1s = [row["image_sha1"] for row in build_index(str(summary.out), progress=False).table.to_pylist()]
    assert len({sha1 for sha1 in sha1s if sha1}) == summary.distinct_images
    again = write_llava_shards(json_path, tmp_path / "images", tmp_path / "out", samples_per_shard=3, workers=1,
                               progress=False)  # read back from the stats files
    assert again.shards_written == 0 and again.report().split("\n")[1:] == summary.report().split("\n")[1:]


def test_the_mix_counts_its_repeated_photographs(mix, mix_shards):
    # The fixture's Visual Genome and TextVQA records reuse COCO's photographs under their own names.
    kept = [r["image"] for r in mix.records if "image" in r and r["id"] not in mix.left_out]
    contents = {hashlib.sha1((mix.images / image).read_bytes()).hexdigest() for image in kept}
    assert mix_shards.distinct_images == len(contents) < len(kept) == mix_shards.images
    assert (mix_shards.repeats_by_path, mix_shards.repeats_by_content) == (0, len(kept) - len(contents))


def test_a_rerun_skips_finished_shards_and_changes_no_byte(mix, tmp_path):
    first = _shard(mix, tmp_path)
    before = _digests(first.shards)
    again = _shard(mix, tmp_path)
    assert (again.shards_written, again.shards_skipped) == (0, len(first.shards))
    assert _digests(again.shards) == before
    assert again.report().split("\n")[1:] == first.report().split("\n")[1:]  # same counts, read from stats files


def test_a_killed_run_is_finished_by_a_rerun(mix, tmp_path):
    first = _shard(mix, tmp_path)
    before = _digests(first.shards)
    killed_after_tar = first.shards[1]  # tar renamed, stats file not yet written
    (tmp_path / killed_after_tar.name.replace(".tar", "_stats.json")).unlink()
    killed_while_writing = first.shards[3]  # only a partial tar, cut short, and no stats file
    partial = killed_while_writing.with_name(killed_while_writing.name + ".tmp-4242")
    partial.write_bytes(killed_while_writing.read_bytes()[:700])
    killed_while_writing.unlink()
    (tmp_path / killed_while_writing.name.replace(".tar", "_stats.json")).unlink()

    again = _shard(mix, tmp_path)
    assert (again.shards_written, again.shards_skipped) == (2, 2)
    assert _digests(again.shards) == before
    assert not list(tmp_path.glob("*.tmp-*"))
    assert pq.read_table(again.failures_file).num_rows == len(mix.left_out)


def test_two_workers_write_the_same_bytes_as_one(mix, mix_shards, tmp_path):
    parallel = write_llava_shards(mix.json_path, mix.images, tmp_path, samples_per_shard=MIX_PER_SHARD, workers=2,
                                  progress=False)
    assert _digests(parallel.shards) == _digests(mix_shards.shards)
    assert parallel.failures_file.read_bytes() == mix_shards.failures_file.read_bytes()


def test_shuffle_is_seeded(mix, mix_shards, tmp_path):
    def ids(summary):
        return [json.loads(s["json"])["id"] for s in _samples(summary.shards)]

    seed0 = _shard(mix, tmp_path / "a", shuffle=True, seed=0)
    assert _digests(_shard(mix, tmp_path / "b", shuffle=True, seed=0).shards) == _digests(seed0.shards)
    seed1 = _shard(mix, tmp_path / "c", shuffle=True, seed=1)
    plain = ids(mix_shards)
    assert len({tuple(plain), tuple(ids(seed0)), tuple(ids(seed1))}) == 3
    assert sorted(ids(seed0)) == sorted(ids(seed1)) == sorted(plain)


def test_exact_shard_count_splits_evenly(mix, tmp_path):
    write_llava_shards(mix.json_path, mix.images, tmp_path, num_shards=4, prefix="mix", workers=1, progress=False)
    stats = [json.loads((tmp_path / f"mix-{i:05d}_stats.json").read_text()) for i in range(4)]
    assert [s["samples"] + len(s["failures"]) for s in stats] == [8, 8, 7, 7]  # records per shard, left out or not


def test_another_run_in_the_same_directory_is_refused_or_replaced(mix, pretrain, tmp_path):
    _shard(mix, tmp_path)
    with pytest.raises(UsageError, match="--samples-per-shard was 8, now 5"):
        write_llava_shards(mix.json_path, mix.images, tmp_path, samples_per_shard=5, workers=1, progress=False)
    with pytest.raises(UsageError, match="--max-image-bytes was 67108864, now 1000"):
        _shard(mix, tmp_path, max_image_bytes=1000)
    with pytest.raises(UsageError, match="its JSON .* had sha256"):
        write_llava_shards(pretrain.json_path, pretrain.images, tmp_path, samples_per_shard=8,
                           prefix="llava_v1_5_mix665k", workers=1, progress=False)
    replaced = write_llava_shards(mix.json_path, mix.images, tmp_path, samples_per_shard=5, overwrite=True,
                                  workers=1, progress=False)
    assert sorted(tmp_path.glob("*.tar")) == list(replaced.shards) and len(replaced.shards) == 6


def test_a_second_prefix_adds_its_shards_beside_the_first(mix, pretrain, tmp_path):
    def cut(llava: LlavaSet, out: Path, prefix: str, **options):
        return write_llava_shards(llava.json_path, llava.images, out, prefix=prefix, samples_per_shard=MIX_PER_SHARD,
                                  workers=1, progress=False, **options)

    alone_a, alone_b = cut(mix, tmp_path / "a", "a"), cut(pretrain, tmp_path / "b", "b")
    grown = tmp_path / "grown"
    first = cut(mix, grown, "a")
    second = cut(pretrain, grown, "b")
    assert (second.shards_written, second.shards_skipped) == (len(alone_b.shards), 0)
    assert sorted(grown.glob("*.tar")) == [*first.shards, *second.shards]
    for alone, together in ((alone_a, first), (alone_b, second)):
        assert list(_digests(together.shards).values()) == list(_digests(alone.shards).values())
        assert together.failures_file.read_bytes() == alone.failures_file.read_bytes()
    assert pq.read_table(first.failures_file).num_rows == len(mix.left_out)
    assert len(build_index(str(grown), progress=False).table) == first.samples + second.samples

    # A run of one prefix never touches another's files, not even its unfinished writes.
    (grown / "b-00000.tar.tmp-4242").write_bytes(b"a write of b's in progress")
    b_files = {path.name: path.read_bytes() for path in grown.iterdir() if path.name.startswith("b")}
    assert cut(mix, grown, "a").shards_written == 0
    with pytest.raises(UsageError, match="holds a-\\* shards of another run \\(--samples-per-shard was 8, now 5\\)"):
        write_llava_shards(mix.json_path, mix.images, grown, prefix="a", samples_per_shard=5, workers=1,
                           progress=False)
    replaced = write_llava_shards(mix.json_path, mix.images, grown, prefix="a", samples_per_shard=5, overwrite=True,
                                  workers=1, progress=False)
    assert sorted(grown.glob("*.tar")) == [*replaced.shards, *second.shards] and len(replaced.shards) == 6
    assert {path.name: path.read_bytes() for path in grown.iterdir() if path.name.startswith("b")} == b_files


def test_a_shard_whose_prefix_lost_its_record_is_refused(mix, pretrain, tmp_path):
    _shard(mix, tmp_path, prefix="a")
    (tmp_path / "a_sharding.json").unlink()
    with pytest.raises(UsageError, match="a-00000.tar and 3 more .tar files that no `pipeline shards llava` run"):
        write_llava_shards(pretrain.json_path, pretrain.images, tmp_path, prefix="b", workers=1, progress=False)


def test_a_resume_with_another_images_folder_is_refused(mix, tmp_path):
    _shard(mix, tmp_path / "out")
    copy = shutil.copytree(mix.images, tmp_path / "copy")  # same names, maybe other files: another dataset
    with pytest.raises(UsageError, match=f"--images was {mix.images.resolve()}, now {copy.resolve()}"):
        write_llava_shards(mix.json_path, copy, tmp_path / "out", samples_per_shard=MIX_PER_SHARD, workers=1,
                           progress=False)
    (tmp_path / "link").symlink_to(mix.images, target_is_directory=True)  # the same folder by another name
    again = write_llava_shards(mix.json_path, tmp_path / "link", tmp_path / "out", samples_per_shard=MIX_PER_SHARD,
                               workers=1, progress=False)
    assert again.shards_written == 0


def test_unrecorded_tars_in_the_output_are_refused(mix, tmp_path):
    (tmp_path / "old-00000.tar").write_bytes(b"")
    with pytest.raises(UsageError, match="no `pipeline shards llava` run recorded"):
        _shard(mix, tmp_path)
    _shard(mix, tmp_path, overwrite=True)
    assert not (tmp_path / "old-00000.tar").exists()


def test_records_that_are_not_llava_shaped_are_left_out(mix, tmp_path):
    bad = [{"image": "x.jpg", "conversations": []}, ["not", "an", "object"],
           {"id": "t", "conversations": [{"from": 1}]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad + [mix.records[0]]))
    summary = write_llava_shards(path, mix.images, tmp_path / "out", workers=1, progress=False)
    assert summary.samples == 1 and summary.failures == {"bad record": 3}
    details = pq.read_table(summary.failures_file).column("detail").to_pylist()
    assert "id" in details[0] and "object" in details[1] and "conversations[0]" in details[2]


def _shard_hostile(hostile: HostileSet, records: list[dict], out: Path):
    path = out.with_suffix(".json")
    path.write_text(json.dumps(records))
    return write_llava_shards(path, hostile.images, out, max_image_bytes=HOSTILE_LIMIT, workers=1, progress=False)


def _failure_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _stored(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode()


# Before its fix, the FIFO case blocked the run forever in open().
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["parent folder", "absolute path", "symlink out", "symlinked folder out",
                                  "/etc/passwd", "/etc/passwd by ..", "/dev/zero", "/dev/zero by symlink", "fifo",
                                  "folder", "too large", "nul byte", "lone surrogate"])
def test_an_image_path_the_images_folder_does_not_hold_as_a_file_is_left_out(hostile, case, tmp_path):
    image, reason = hostile.hostile[case]
    summary = _shard_hostile(hostile, [*hostile.good[:2], hostile_record(case, hostile), *hostile.good[2:]],
                             tmp_path / "out")
    assert summary.samples == len(hostile.good) and summary.failures == {reason: 1}
    (row,) = _failure_rows(summary.failures_file)
    assert (row["record"], row["image"], row["reason"]) == (2, _stored(image), reason)
    assert image in row["detail"] or repr(image) in row["detail"], row["detail"]
    good = {(hostile.images / "good" / name).read_bytes() for name in ("0.jpg", "1.jpg")}
    assert {_image(sample)[1] for sample in _samples(summary.shards) if _image(sample)} == good


def test_no_failure_quotes_the_file_it_describes(hostile, mix, mix_shards, tmp_path):
    secret = Path("/etc/passwd").read_bytes()[:8]
    records = [hostile_record(case, hostile) for case in ("/etc/passwd", "/etc/passwd by ..")]
    summary = _shard_hostile(hostile, [*records, *hostile.good], tmp_path / "out")
    written = [summary.failures_file.read_bytes(), *(path.read_bytes() for path in summary.shards)]
    assert not any(secret in data for data in written)
    texts = [value for row in _failure_rows(summary.failures_file) for value in row.values()
             if isinstance(value, str)]
    assert not any(secret.decode("latin-1") in text for text in texts)
    assert summary.failures == {"bad path": 1, "outside images": 1}
    # A file inside the folder that is no image (an HTML error page) is described, not quoted.
    details = {row["reason"]: row["detail"] for row in _failure_rows(mix_shards.failures_file)}
    assert "html" not in details["not an image"].lower()


def test_devices_inside_the_images_folder_are_not_read(tmp_path):
    records = [{"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>"}]}
               for name in ("zero", "null")]
    (tmp_path / "dev.json").write_text(json.dumps(records))
    summary = write_llava_shards(tmp_path / "dev.json", "/dev", tmp_path / "out", workers=1, progress=False)
    assert summary.samples == 0 and summary.failures == {"not a file": 2}
    assert [row["detail"] for row in _failure_rows(summary.failures_file)] == [
        "/dev/zero is a device, FIFO or socket, not a regular file", "/dev/null is a device, FIFO or socket, "
        "not a regular file"]


def test_a_record_with_text_utf8_cannot_hold_is_left_out(mix, tmp_path):
    broken = {**mix.records[0], "id": "surrogate", "conversations": [{"from": "human", "value": "<image>\ud800"}]}
    (tmp_path / "broken.json").write_text(json.dumps([broken, mix.records[1]]))
    summary = write_llava_shards(tmp_path / "broken.json", mix.images, tmp_path / "out", workers=1, progress=False)
    assert summary.samples == 1 and summary.failures == {"bad record": 1}
    assert "lone surrogate" in _failure_rows(summary.failures_file)[0]["detail"]


def _cli(*args, timeout: float | None = None):
    return subprocess.run([sys.executable, "-m", "pipeline", "shards", "llava", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def test_cli_help_explains_the_layout():
    result = _cli("--help")
    assert result.returncode == 0
    for words in ("--images", "--samples-per-shard", "--shuffle", "--workers", "failures.parquet", "558k"):
        assert words in result.stdout


def test_cli_missing_json_is_one_line_and_exit_2(tmp_path):
    result = _cli(str(tmp_path / "nope.json"), "--images", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.json does not exist" in result.stderr


def test_cli_writes_shards_and_reports(mix, mix_shards, tmp_path):
    shutil.copy(mix.json_path, tmp_path / "mix.json")
    result = _cli(str(tmp_path / "mix.json"), "--images", str(mix.images), "--out", str(tmp_path / "out"),
                  "--samples-per-shard", str(MIX_PER_SHARD), "--prefix", "llava_v1_5_mix665k", "--workers", "1",
                  "--quiet")
    assert result.returncode == 0, result.stderr
    assert "27 samples" in result.stdout and "1 missing" in result.stdout and "lying extensions: 1" in result.stdout
    assert f"{mix_shards.distinct_images} distinct image(s)" in result.stdout
    assert _digests(sorted((tmp_path / "out").glob("*.tar"))) == _digests(mix_shards.shards)


def test_cli_leaves_out_every_hostile_record_writes_the_rest_and_exits_0(hostile, tmp_path):
    cases = sorted(hostile.hostile)
    records = [*hostile.good, *(hostile_record(case, hostile) for case in cases)]
    (tmp_path / "hostile.json").write_text(json.dumps(records))
    result = _cli(str(tmp_path / "hostile.json"), "--images", str(hostile.images), "--out", str(tmp_path / "out"),
                  "--samples-per-shard", "4", "--workers", "2", "--max-image-bytes", str(HOSTILE_LIMIT), "--quiet",
                  timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{len(hostile.good)} samples" in result.stdout
    rows = _failure_rows(failures_path(tmp_path / "out", "hostile"))
    assert {row["id"]: row["reason"] for row in rows} == {f"hostile {case}": hostile.hostile[case][1]
                                                          for case in cases}


def test_cli_refuses_to_resume_with_another_images_folder(mix, tmp_path):
    copy = shutil.copytree(mix.images, tmp_path / "copy")
    first = _cli(str(mix.json_path), "--images", str(mix.images), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--quiet")
    assert first.returncode == 0, first.stderr
    command = [str(mix.json_path), "--images", str(copy), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"]
    refused = _cli(*command)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--images was" in refused.stderr
    assert _cli(*command, "--overwrite").returncode == 0


@pytest.mark.timeout(120)
def test_killing_the_command_takes_its_worker_processes_with_it(pretrain, tmp_path):
    # Enough one-record shards to keep two workers busy for seconds; the kill comes after the first few.
    records = [{**pretrain.records[i % len(pretrain.records)], "id": str(i)} for i in range(10_000)]
    (tmp_path / "many.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "shards", "llava", str(tmp_path / "many.json"), "--images",
               str(pretrain.images), "--out", str(out), "--samples-per-shard", "1", "--workers", "2", "--quiet"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert job.poll() is None, f"the run ended (exit {job.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "no two workers writing shards within 60 s"
            processes = psutil.Process(job.pid).children(recursive=True)
            workers = [p for p in processes if "--multiprocessing-fork" in _cmdline(p)]
            if len(workers) == 2 and any(out.glob("*_stats.json")):
                break
            time.sleep(0.01)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, f"alive 10 s after the command was killed: {[_cmdline(p) for p in alive]}"
    finally:
        job.kill()
        kill_left_behind(processes)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone since it was listed
        return []
