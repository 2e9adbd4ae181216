"""Two CPU processes under `accelerate launch`: the run completes, ranks see disjoint samples, InfoNCE gathers keys.

`accelerate launch --cpu` starts one process whatever --num_processes says; `--multi_gpu` selects the torchrun
launcher, and both the trainer and the worker script fall back to CPU (gloo) on a machine without GPUs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import DEMO_EXPERIMENT, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def launch(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_on_disjoint_samples(demo_store, demo_dir, tmp_path):
    out = tmp_path / "run"
    settings = [f"output_dir={out}", "train.max_steps=3", "data.num_workers=0", "data.batch_size=2",
                "train.record_rows=true", "train.save_every=3", "train.trackers=[]"]
    result = subprocess.run(
        [*launch(free_port()), "-m", "pipeline", "train", "--config", str(DEMO_EXPERIMENT), "--quiet",
         *(f"--set={s}" for s in settings)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "DEMO_DIR": str(demo_dir)}, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads((out / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 3 * 2
    assert not set(rows[0]) & set(rows[1]), rows
    provenance = json.loads((out / "training_provenance.json").read_text())
    assert provenance["world_size"] == 2 and provenance["samples"] == 3 * 2 * 2
    for term in ("loss", "lm", "depth", "seg", "gen", "depth_3/infonce"):
        assert math.isfinite(provenance["final_loss"][term]), term
    assert sorted(p.name for p in (out / "checkpoints" / "step-3").glob("data-rank*.json")) == [
        "data-rank0.json", "data-rank1.json"]


def test_infonce_gathers_targets_across_two_processes(tmp_path):
    out = tmp_path / "gather.json"
    result = subprocess.run(
        [*launch(free_port()), str(REPO / "tests" / "student" / "gather_worker.py"), str(out)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    per_rank = report["per_rank"]
    for term in (0, 1):  # infonce, smooth_l1: equal valid counts per rank, so the mean of rank means is the mean
        assert sum(r[term] for r in per_rank) / 2 == pytest.approx(report["whole"][term], rel=1e-5)
    assert report["keys_seen"] == pytest.approx([3 * 2, 3 * 2], rel=1e-5)  # micro-batch 3 x 2 processes
