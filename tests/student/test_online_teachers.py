"""`data.online_teachers`: the store's teachers, rebuilt from its specs, give the store's targets and loss."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import DEMO_BLOCKS, DEMO_EXPERIMENT, DEMO_TEACHERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def settings(tmp_path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / 'out'}", "train.max_steps=2", "data.num_workers=0", "data.batch_size=3",
            "data.shuffle=false", "train.trackers=[]", *extra]


def first_batch_losses(store, tmp_path, *extra: str):
    """(cached targets, online targets, cached loss terms, online loss terms) of the same first batch."""
    from pipeline.online_targets import online_targets_factory
    from student.config import load_experiment
    from student.trainer import batch_targets, build_training, compute_loss

    results = []
    for online in (False, True):
        cfg = load_experiment(str(DEMO_EXPERIMENT), settings(tmp_path, f"data.store={store}",
                                                             f"data.online_teachers={str(online).lower()}", *extra))
        parts = build_training(cfg, online_targets=online_targets_factory(cfg))
        batch = next(iter(parts.loader))
        assert (batch.images is not None) == online
        with torch.no_grad():
            total, terms = compute_loss(parts, batch)
        results.append((batch.rows.tolist(), batch_targets(parts, batch), {"loss": total, **terms}))
    (rows, cached, cached_terms), (online_rows, online, online_terms) = results
    assert rows == online_rows
    return cached, online, cached_terms, online_terms


def assert_same_loss(cached_terms, online_terms):
    assert set(cached_terms) == set(online_terms)
    for name, value in cached_terms.items():
        torch.testing.assert_close(online_terms[name], value, rtol=2e-3, atol=1e-5, msg=name)


def test_online_teachers_give_the_stored_targets_and_the_same_loss(demo_store, demo_dir, tmp_path):
    (cached, cached_valid), (online, online_valid), cached_terms, online_terms = first_batch_losses(
        demo_store, tmp_path)
    for name in ("depth", "seg", "gen"):
        assert online_valid[name].tolist() == cached_valid[name].tolist() == [True] * 3
        # Both went through float16 storage; the teachers ran on other batches, so a value may land one float16
        # step away, no more.
        torch.testing.assert_close(online[name], cached[name], rtol=2**-10, atol=1e-6, msg=name)
    assert_same_loss(cached_terms, online_terms)


def test_online_teachers_round_like_an_int8_pooled_store(demo_dir, ray_local, tmp_path):
    """Compact storage loses information; online targets must lose exactly the same."""
    import yaml

    from pipeline.precompute import PrecomputeConfig, run_precompute

    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    manifest["teachers"] = {"depth": {**manifest["teachers"]["depth"], "quantize": "int8", "pool": 2}}
    (tmp_path / "int8.yaml").write_text(yaml.safe_dump(manifest))
    store = tmp_path / "int8-store"
    run_precompute(str(demo_dir / "shards"), str(tmp_path / "int8.yaml"), str(store),
                   PrecomputeConfig(**DEMO_BLOCKS), progress=False)
    depth_only = ["model.tasks={depth: {layers: [3, 4]}}", "model.task_order=null"]
    (cached, _), (online, online_valid), cached_terms, online_terms = first_batch_losses(store, tmp_path, *depth_only)
    assert online_valid["depth"].all()
    # Pooled 2x2: every stored token comes back as 4 equal tokens, in both modes.
    grid = online["depth"].reshape(3, 12, 2, 12, 2, -1)
    assert torch.equal(grid, grid[:, :, :1, :, :1].expand_as(grid))
    step = cached["depth"].abs().amax(dim=-1, keepdim=True) / 127  # one int8 code
    assert ((online["depth"] - cached["depth"]).abs() <= step * 1.01 + 1e-6).all()
    assert (online["depth"] == cached["depth"]).float().mean() > 0.99
    assert_same_loss(cached_terms, online_terms)


def test_online_teachers_refuse_a_store_whose_teacher_weights_changed(store_copy):
    from pipeline.data.errors import UsageError
    from pipeline.online_targets import OnlineTargets

    meta = store_copy / "gen" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["teacher_fingerprint"] = "0" * 64
    meta.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"teacher 'gen'.*fingerprint.*accept_fingerprint_mismatch"):
        OnlineTargets(str(store_copy), ["gen"])


def test_online_teachers_need_a_factory_from_the_caller(demo_store, tmp_path):
    """The trainer never imports the teachers: in this mode its caller hands it a factory of them."""
    from pipeline.data.errors import UsageError
    from student.config import load_experiment
    from student.trainer import train

    cfg = load_experiment(str(DEMO_EXPERIMENT), settings(tmp_path, f"data.store={demo_store}",
                                                         "data.online_teachers=true"))
    with pytest.raises(UsageError, match=r"online_teachers.*online_targets_factory"):
        train(cfg, progress=False)
    assert not (tmp_path / "out").exists()
