"""`pipeline probe` on the demo store: a real (2-step) student, real cached targets, real probes."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from PIL import Image

from pipeline.data.errors import UsageError
from student.checkpoint import load_frozen_student
from student.probe import (
    PLOT_DPI,
    PLOT_SIZE_INCHES,
    LayerProbe,
    ProbeConfig,
    cache_hidden_states,
    probe_cosine,
    run_probe,
    split_shards,
    train_probe,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEACHERS = ("depth", "seg", "gen")
PLOT_PIXELS = (round(PLOT_SIZE_INCHES[0] * PLOT_DPI), round(PLOT_SIZE_INCHES[1] * PLOT_DPI))


@pytest.fixture(scope="module")
def probed(demo_checkpoint, demo_store, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    [result] = run_probe(str(demo_checkpoint), str(demo_store), str(out), shards=str(demo_dir / "shards"),
                         config=ProbeConfig(steps=2, batch_size=4))
    return out, result


def test_table_has_one_row_per_layer_per_teacher_with_cosines_in_range(probed, demo_checkpoint):
    out, result = probed
    layers = list(range(1, 5))  # the demo LLM has 4 layers
    assert sorted((r["teacher"], r["layer"]) for r in result.table) == sorted(
        (t, layer) for t in TEACHERS for layer in layers)
    for row in result.table:
        assert -1.0 <= row["cosine"] <= 1.0 and -1.0 <= row["untrained_cosine"] <= 1.0
        assert row["checkpoint"] == str(demo_checkpoint)
        assert row["train_images"] == 30 and row["test_images"] == 10  # 4 shards of 10: the last one held out
    with open(out / "probe.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(TEACHERS) * len(layers)
    written = json.loads((out / "probe.json").read_text())
    assert written["table"] == json.loads(json.dumps(result.table))
    assert written["runs"][0]["shards_test"] == ["demo-00003.tar"]


def test_a_trained_probe_beats_the_same_probe_untrained(demo_checkpoint, demo_store, demo_dir):
    # Same initial weights, same layer, same held-out images: only the training differs. Even with random tiny
    # models the depth targets have structure (per-position means at least) that a trained probe recovers.
    torch = pytest.importorskip("torch")
    model, tokenizer, image_processor = load_frozen_student(str(demo_checkpoint))
    train, test = cache_hidden_states(model, tokenizer, image_processor, str(demo_dir / "shards"), str(demo_store),
                                      ["depth"], [4], {"demo-00003.tar"})
    tokens, channels = train.targets["depth"].shape[1:]
    torch.manual_seed(0)
    probe = LayerProbe(model.config.text_config.hidden_size, tokens, channels)
    args = (test.states[4], test.mask, test.targets["depth"], test.valid["depth"])
    untrained = probe_cosine(probe, *args)
    train_probe(probe, train.states[4], train.mask, train.targets["depth"], train.valid["depth"], steps=20,
                batch_size=8, lr=2e-3, seed=0)
    trained = probe_cosine(probe, *args)
    assert -1 <= untrained <= 1 and -1 <= trained <= 1
    assert trained > untrained + 0.1, (trained, untrained)


def test_plot_is_a_png_of_the_expected_size(probed):
    out, _ = probed
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "probe.png") as image:
        assert image.format == "PNG" and image.size == PLOT_PIXELS


def test_compare_puts_both_checkpoints_in_one_table_and_plot(demo_checkpoint, demo_store, demo_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(demo_checkpoint, other)
    results = run_probe(str(demo_checkpoint), str(demo_store), str(tmp_path / "out"), compare=str(other),
                        shards=str(demo_dir / "shards"), config=ProbeConfig(layers=(2, 4), teachers=("gen",), steps=3, max_images=6))
    table = json.loads((tmp_path / "out" / "probe.json").read_text())["table"]
    assert [(r["checkpoint"], r["layer"]) for r in table] == [
        (str(demo_checkpoint), 2), (str(demo_checkpoint), 4), (str(other), 2), (str(other), 4)]
    # The copy is the same student, probed on the same split with the same seed: the same numbers.
    assert [r["cosine"] for r in results[0].table] == pytest.approx([r["cosine"] for r in results[1].table])
    with Image.open(tmp_path / "out" / "probe.png") as image:
        assert image.size == PLOT_PIXELS


def test_a_single_shard_cannot_be_split(demo_dir):
    one = str(sorted((demo_dir / "shards").glob("*.tar"))[0])
    with pytest.raises(UsageError, match="holds out whole shards"):
        split_shards(one, 1)


def test_a_layer_the_student_lacks_is_refused(demo_checkpoint, demo_store, demo_dir, tmp_path):
    with pytest.raises(UsageError, match="layers 1..4"):
        run_probe(str(demo_checkpoint), str(demo_store), str(tmp_path), shards=str(demo_dir / "shards"),
                  config=ProbeConfig(layers=(9,)))
