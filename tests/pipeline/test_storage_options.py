"""Compact and bfloat16 storage: recorded in the teacher's attributes, undone by the reader, readable elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.data.store import TargetStore
from tests.conftest import DEMO_BLOCKS, DEMO_TEACHERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
DEMO_SETTINGS = PrecomputeConfig(**DEMO_BLOCKS)


def manifest_with(tmp_path: Path, **storage) -> Path:
    data = yaml.safe_load(DEMO_TEACHERS.read_text())
    data["teachers"] = {name: {**spec, **storage} for name, spec in data["teachers"].items() if name != "gen"}
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def relative_error(store: Path, reference: Path, name: str) -> float:
    decoded, valid = TargetStore(str(store)).read_rows(name, 0, 40)
    exact, _ = TargetStore(str(reference)).read_rows(name, 0, 40)
    assert valid.all() and decoded.shape == exact.shape
    return float(np.linalg.norm(decoded - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize(
    ("storage", "stored_tokens", "dtype", "max_error"),
    [
        ({"storage_dtype": "bfloat16"}, 576, "bfloat16", 1e-2),
        ({"quantize": "int8"}, 576, "int8", 2e-2),
        ({"quantize": "int8", "pool": 2}, 144, "int8", 1.0),
    ],
)
def test_storage_options_are_recorded_and_undone_by_the_reader(demo_dir, demo_store, tmp_path, storage,
                                                               stored_tokens, dtype, max_error):
    store = tmp_path / "store"
    run_precompute(str(demo_dir / "shards"), str(manifest_with(tmp_path, **storage)), str(store), DEMO_SETTINGS,
                   progress=False)
    root = zarr.open_group(str(store), mode="r")
    for name in ("depth", "seg"):
        attrs = root[name].attrs
        assert attrs["target_shape"][0] == 576
        assert attrs["storage"]["stored_shape"][0] == stored_tokens
        assert str(root[name]["target"].dtype) == dtype
        assert ("scale" in root[name]) == (storage.get("quantize") == "int8")
        assert relative_error(store, demo_store, name) < max_error
    raw = sum(TargetStore(str(demo_store)).nbytes(n) for n in ("depth", "seg"))
    compact = sum(TargetStore(str(store)).nbytes(n) for n in ("depth", "seg"))
    if storage.get("quantize") or storage.get("pool"):
        assert compact < raw * 0.8


def test_bfloat16_targets_are_read_by_tensorstore(demo_dir, tmp_path):
    import tensorstore as ts

    store = tmp_path / "store"
    run_precompute(str(demo_dir / "shards"), str(manifest_with(tmp_path, storage_dtype="bfloat16")), str(store),
                   DEMO_SETTINGS, progress=False)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "depth" / "target")}}
    array = ts.open(spec, read=True).result()
    assert array.dtype.name == "bfloat16"
    ours = zarr.open_array(str(store / "depth" / "target"))[:]
    np.testing.assert_array_equal(np.asarray(array.read().result()).astype(np.float32), ours.astype(np.float32))
