"""`pipeline train` end to end on the demo store: real shards, real store, real tiny student."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import DEMO_EXPERIMENT, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def overrides(tmp_path, steps: int) -> list[str]:
    return [f"output_dir={tmp_path / 'checkpoint'}", f"train.max_steps={steps}", "data.num_workers=0",
            "data.batch_size=2"]


TRAIN_AND_REPORT = """
import json, sys
teacher_assets = sys.argv[1]
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(teacher_assets):
        opened.append(args[0])
sys.addaudithook(audit)
from student.config import load_experiment
from student.trainer import train
result = train(load_experiment(sys.argv[2], sys.argv[3:]), progress=False)
import torch
print(json.dumps({
    "torch_threads": torch.get_num_threads(),
    "teacher_modules": sorted(m for m in sys.modules if m.split(".")[0] == "teachers"),
    "opened_teacher_files": opened,
    "first": result.first_loss, "final": result.final_loss, "steps": result.steps,
}))
"""


def test_training_runs_without_any_teacher_and_writes_a_loadable_checkpoint(demo_store, demo_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_REPORT, str(demo_dir / "assets" / "teachers"), str(DEMO_EXPERIMENT),
         *overrides(tmp_path, steps=3)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "DEMO_DIR": str(demo_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["teacher_modules"] == []
    assert report["opened_teacher_files"] == []
    assert report["steps"] == 3
    for term in ("loss", "lm", "depth", "seg", "gen"):
        assert math.isfinite(report["final"][term]), term

    from student.model import OlaStudent

    checkpoint = tmp_path / "checkpoint"
    student = OlaStudent.from_pretrained(checkpoint)
    assert set(student.config.task_names()) == {"depth", "seg", "gen"}
    provenance = json.loads((checkpoint / "training_provenance.json").read_text())
    store_attrs = json.loads((demo_store / "zarr.json").read_text())["attributes"]
    assert provenance["store"]["dataset_fingerprint"] == store_attrs["dataset_fingerprint"]
    for name in ("depth", "seg", "gen"):
        group = json.loads((demo_store / name / "zarr.json").read_text())["attributes"]
        assert provenance["store"]["teachers"][name]["teacher_fingerprint"] == group["teacher_fingerprint"]
    assert provenance["rows"]["count"] == 3 * 2  # 3 steps of batch 2, distinct rows
    assert provenance["cpu_threads"] == report["torch_threads"]
    assert all(0 <= start < stop <= 40 for start, stop in provenance["rows"]["ranges"])
    metrics = [json.loads(line) for line in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (checkpoint / "tensorboard").rglob("events.out.tfevents.*")
                     if "lr" in EventAccumulator(str(p.parent)).Reload().Tags()["scalars"]}
    scalars = EventAccumulator(str(events_dir)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"loss", "lm", "depth", "seg", "gen", "depth_3/smooth_l1", "depth_3/infonce", "lr", "samples_per_s",
            "data_wait_fraction"} <= tags, tags
    assert [e.step for e in scalars.Scalars("loss")] == [1, 2, 3]


def test_loss_is_finite_and_decreases_on_a_fixed_batch(demo_store, demo_dir, tmp_path):
    from student.config import load_experiment
    from student.trainer import build_training, train_step

    cfg = load_experiment(str(DEMO_EXPERIMENT), overrides(tmp_path, steps=50) + ["train.warmup_ratio=0"])
    parts = build_training(cfg)
    batch = next(iter(parts.loader))
    losses = [train_step(parts, batch)["loss"] for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] * 0.9, losses


def test_wrong_teacher_fingerprint_is_refused(demo_store, demo_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", str(DEMO_EXPERIMENT), "--quiet",
         *(f"--set={o}" for o in overrides(tmp_path, steps=1)), "--set", "data.expected_fingerprints.depth=abc123"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "DEMO_DIR": str(demo_dir)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fingerprint" in result.stderr and "depth" in result.stderr
