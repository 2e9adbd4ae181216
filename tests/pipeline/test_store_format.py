"""The store contract of DESIGN.md, checked the way another tool would read it: without this package."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import zarr

from tests.conftest import DEMO_SAMPLES

TEACHERS = ("depth", "seg", "gen")


def test_plain_zarr_reads_the_store_without_this_package(demo_store):
    script = f"""
import json, sys
import numpy as np, pyarrow.parquet as pq, zarr
root = zarr.open_group({str(demo_store)!r}, mode="r")
index = pq.read_table({str(demo_store / "index.parquet")!r})
out = {{"attrs": dict(root.attrs), "rows": index.num_rows, "teachers": {{}},
       "distinct": len(set(index.column("image_sha1").to_pylist())),
       "mapped": sorted(set(index.column("target_row").to_pylist()))}}
for name in {list(TEACHERS)!r}:
    target, valid = root[name]["target"], root[name]["valid"]
    out["teachers"][name] = {{"shape": list(target.shape), "dtype": str(target.dtype),
                              "valid": int(np.asarray(valid[:]).sum()), "attrs": dict(root[name].attrs),
                              "finite": bool(np.isfinite(np.asarray(target[:], dtype=np.float32)).all())}}
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "teachers", "student"))
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd="/")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert report["attrs"]["format"] == "teacher-targets"
    assert report["attrs"]["format_version"] == 2
    # The demo's photos are all distinct, so every sample has its own target row, mapped by index.parquet.
    assert report["attrs"]["num_samples"] == report["rows"] == report["distinct"] == DEMO_SAMPLES
    assert report["attrs"]["num_rows"] == DEMO_SAMPLES and report["mapped"] == list(range(DEMO_SAMPLES))
    assert report["attrs"]["row_ranges"] == [[0, DEMO_SAMPLES]]
    for name in TEACHERS:
        info = report["teachers"][name]
        tokens, channels = info["attrs"]["target_shape"]
        assert info["shape"] == [DEMO_SAMPLES, tokens, channels]
        assert info["dtype"] == "float16"
        assert info["valid"] == DEMO_SAMPLES
        assert info["finite"]
        assert info["attrs"]["complete"] is True
        assert len(info["attrs"]["teacher_fingerprint"]) == 64


def test_block_records_are_plain_sorted_json_with_the_documented_fields(demo_store):
    attrs = json.loads((demo_store / "zarr.json").read_text())["attributes"]
    blocks = -(-attrs["num_rows"] // attrs["rows_per_block"])
    for name in TEACHERS:
        paths = sorted((demo_store / "_blocks" / name).glob("*.json"))
        assert [p.name for p in paths] == [f"{block:06d}.json" for block in range(blocks)]
        for block, path in enumerate(paths):
            data = path.read_bytes()
            record = json.loads(data)
            assert data == json.dumps(record, sort_keys=True, indent=1).encode()
            assert set(record) == {"teacher", "fingerprint", "block", "start", "stop", "rows", "written", "failures",
                                   "digest", "stats", "batch_size", "seconds", "reused"}
            assert set(record["stats"]) == {"count", "sum", "sumsq"}
            assert (record["teacher"], record["block"]) == (name, block)
            start = block * attrs["rows_per_block"]
            assert (record["start"], record["stop"]) == (start, min(start + attrs["rows_per_block"], attrs["num_rows"]))
            assert record["rows"] == record["stop"] - record["start"]


def test_rows_align_with_index(demo_store, demo_dir):
    index = pq.read_table(demo_store / "index.parquet").to_pylist()
    assert [r["row"] for r in index] == list(range(DEMO_SAMPLES))
    assert [r["target_row"] for r in index] == list(range(DEMO_SAMPLES))  # every demo photo is a distinct image
    # The index lists the shards' samples in shard order, then tar order.
    import tarfile

    expected = []
    for tar_path in sorted((demo_dir / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys = []
            for member in tar.getmembers():
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
        expected.extend((tar_path.name, k) for k in keys)
    assert [(r["shard"], r["key"]) for r in index] == expected
    assert all(len(r["image_sha1"]) == 40 for r in index)


def test_target_shapes_match_the_teachers(demo_store):
    """The stored shape is what the teacher architecture produces: depth 24x24 tokens of the DINOv2 width, etc."""
    from transformers import AutoConfig

    root = zarr.open_group(str(demo_store), mode="r")
    specs = {name: root[name].attrs["spec"] for name in TEACHERS}
    depth = AutoConfig.from_pretrained(specs["depth"]["model"])
    size = specs["depth"]["image_size"] // depth.backbone_config.patch_size
    assert root["depth"]["target"].shape[1:] == (size * size, depth.backbone_config.hidden_size)
    seg = AutoConfig.from_pretrained(specs["seg"]["model"])
    grid = specs["seg"]["grid"]
    assert root["seg"]["target"].shape[1:] == (grid * grid, seg.backbone_config.hidden_size)
    gen = json.loads((__import__("pathlib").Path(specs["gen"]["model"]) / "image_encoder" / "config.json").read_text())
    assert root["gen"]["target"].shape[1:] == (1, gen["projection_dim"])


def test_tensorstore_reads_what_zarr_reads(demo_store):
    import tensorstore as ts

    for name in TEACHERS:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(demo_store / name / "target")}}
        array = ts.open(spec, read=True).result()
        np.testing.assert_array_equal(array.read().result(), zarr.open_array(str(demo_store / name / "target"))[:])
