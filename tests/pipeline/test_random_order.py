"""Training visits the samples in a seeded random order over all of a rank's data, a new order every epoch, and
reads each sample by its byte range: the first batches draw from many shards, not from one."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from pipeline.data.loader import EpochOrder, TrainingSamples
from tests.conftest import DEMO_EXPERIMENT, DEMO_SAMPLES


def _shard_of_row(store) -> dict[int, str]:
    index = pq.read_table(store / "index.parquet")
    return dict(zip(index.column("row").to_pylist(), index.column("shard").to_pylist()))


def test_each_epoch_is_a_new_permutation_and_ranks_split_it(demo_store, demo_dir):
    dataset = TrainingSamples(str(demo_dir / "shards"), str(demo_store), [], lambda s: s)
    rows = dataset.rows
    one = EpochOrder(rows, seed=0)
    first, second = one.epoch_rows(0).tolist(), one.epoch_rows(1).tolist()
    assert sorted(first) == sorted(second) == sorted(rows.tolist())
    assert first != second and first != sorted(first)
    assert EpochOrder(rows, seed=0).epoch_rows(0).tolist() == first  # seeded
    ranks = [EpochOrder(rows, seed=0, rank=r, world_size=3).epoch_rows(0).tolist() for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(rows) // 3
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])


def test_a_resumed_order_continues_exactly_across_an_epoch_boundary(demo_store, demo_dir):
    dataset = TrainingSamples(str(demo_dir / "shards"), str(demo_store), [], lambda s: s)
    whole = list(EpochOrder(dataset.rows, seed=3, epochs=3))
    for drawn in (0, 7, len(dataset.rows), len(dataset.rows) + 5):
        assert list(EpochOrder(dataset.rows, seed=3, epochs=3, start=drawn)) == whole[drawn:]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_delivers_the_samplers_order_with_any_number_of_workers(demo_store, demo_dir, workers):
    dataset = TrainingSamples(str(demo_dir / "shards"), str(demo_store), ["depth"], lambda s: s)
    order = EpochOrder(dataset.rows, seed=0, epochs=1)
    loader = DataLoader(dataset, batch_size=4, sampler=order, num_workers=workers, collate_fn=list)
    delivered = [sample.row for batch in loader for sample in batch]
    assert delivered == list(order)
    shard = _shard_of_row(demo_store)
    assert len({shard[r] for r in delivered[:8]}) >= 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_first_steps_of_training_draw_from_many_shards(demo_store, demo_dir, tmp_path):
    from tests.conftest import train_from_config

    out = tmp_path / "out"
    train_from_config(str(DEMO_EXPERIMENT), [f"output_dir={out}", "train.max_steps=2", "data.num_workers=0",
                                             "data.batch_size=4", "train.trackers=[]", "train.record_rows=true"],
                      progress=False)
    rows = json.loads((out / "rows-rank0.json").read_text())
    assert len(rows) == 8 and len(set(rows)) == 8
    shard = _shard_of_row(demo_store)
    assert len({shard[r] for r in rows}) >= 3, [shard[r] for r in rows]
    assert max(rows) - min(rows) > DEMO_SAMPLES // 2
