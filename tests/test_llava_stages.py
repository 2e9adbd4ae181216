"""The paper's data as it is published, through every stage: LLaVA JSON -> `pipeline shards llava` -> precompute ->
PT on the 558K-style captions; IFT on the 665K-style mix, whose text-only samples train as LLaVA trains them."""

from __future__ import annotations

import json

import pytest

from pipeline.llava_shards import write_llava_shards
from pipeline.data.loader import NO_IMAGE_FOR_TARGETS, TrainingSamples
from tests.conftest import DEMO_TEACHERS, REPO
from tests.pipeline.llava_fixtures import mix_665k, pretrain_558k

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PT = REPO / "manifests" / "experiments" / "demo_pt.yaml"
IFT = REPO / "manifests" / "experiments" / "demo_ift.yaml"


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pt_on_558k_then_ift_on_the_mix_with_its_text_only_samples(demo_dir, ray_local, tmp_path):
    from pipeline.precompute import PrecomputeConfig, run_precompute
    from tests.conftest import train_from_config

    pretrain, mix = pretrain_558k(tmp_path / "558k"), mix_665k(tmp_path / "665k")
    pt_shards = write_llava_shards(pretrain.json_path, pretrain.images, tmp_path / "pt-shards", num_shards=3,
                                   workers=1, progress=False)
    ift_shards = write_llava_shards(mix.json_path, mix.images, tmp_path / "ift-shards", num_shards=3, workers=1,
                                    progress=False)
    assert ift_shards.text_only == len(mix.text_only) > 0

    store = tmp_path / "store"
    run_precompute(str(pt_shards.out), str(DEMO_TEACHERS), str(store), PrecomputeConfig(rows_per_block=8, workers=1),
                   progress=False)
    pt = tmp_path / "pt"
    train_from_config(str(PT), [f"output_dir={pt}", f"data.shards={pt_shards.out}", f"data.store={store}",
                                "train.max_steps=2", "train.grad_accum=1", "data.batch_size=4", "data.num_workers=0",
                                "train.trackers=[]", "train.save_every=0"], progress=False)
    assert all(r["loss"] > 0 for r in _metrics(pt))

    # One step over the whole mix (one epoch): every text-only sample is trained on exactly once.
    ift = tmp_path / "ift"
    result = train_from_config(str(IFT), [
        f"output_dir={ift}", f"data.shards={ift_shards.out}", f"model.init_from={pt}", "train.max_steps=1",
        "train.grad_accum=1", f"data.batch_size={ift_shards.samples}", "data.num_workers=0", "train.trackers=[]",
        "train.save_every=0"], progress=False)
    (record,) = _metrics(ift)
    assert record["text_only_samples"] == len(mix.text_only) == result.text_only
    assert record["skipped_samples"] == record["excluded_samples"] == 0 and record["loss"] > 0


def test_a_stage_with_targets_leaves_text_only_samples_out_and_counts_them(tmp_path):
    mix = mix_665k(tmp_path / "665k")
    shards = write_llava_shards(mix.json_path, mix.images, tmp_path / "shards", num_shards=2, workers=1,
                                progress=False)
    with_targets = TrainingSamples(str(shards.out), None, [], lambda s: s, text_only=False)
    assert with_targets.excluded == {NO_IMAGE_FOR_TARGETS: len(mix.text_only)}
    next_token_only = TrainingSamples(str(shards.out), None, [], lambda s: s)
    assert len(next_token_only) == shards.samples and not next_token_only.excluded
    delivered = list(next_token_only)
    assert sum(s.image is None for s in delivered) == len(mix.text_only)
