"""Resumable checkpoints: `kill -9` mid-training, rerun, and the losses continue exactly as if never interrupted,
even where the rerun's process has another torch thread count (a sum over other threads rounds differently)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from pipeline.data.errors import UsageError
from student.checkpoint import STATE_FILE, list_checkpoints, resolve_resume
from tests.conftest import DEMO_EXPERIMENT, REPO

# Wall-clock figures of a run, not part of its arithmetic.
TIMING_KEYS = {"samples_per_s", "data_wait_fraction"}
# torch intra-op threads of the killed run and of the process that reruns it: the rerun must compute with the first.
RUN_THREADS, RERUN_THREADS = 2, 1


def run_args(output_dir, steps: int, workers: int) -> list[str]:
    settings = [f"output_dir={output_dir}", f"train.max_steps={steps}", "train.save_every=2",
                "train.keep_checkpoints=0", f"data.num_workers={workers}", "data.batch_size=2", "train.trackers=[]"]
    return ["--config", str(DEMO_EXPERIMENT), "--quiet", *(f"--set={s}" for s in settings)]


def read_metrics(output_dir) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in map(json.loads, lines)}


def train_here(output_dir, steps: int, workers: int, *extra: str):
    """`train_from_config` in this process, as a library user calls it."""
    from tests.conftest import train_from_config

    overrides = [a.removeprefix("--set=") for a in run_args(output_dir, steps, workers)[3:]]
    return train_from_config(str(DEMO_EXPERIMENT), [*overrides, *extra], progress=False)


@contextmanager
def torch_threads(count: int):
    """This process computes with `count` torch threads inside, with its own count again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def recorded_threads(output_dir, step: int) -> int:
    return json.loads((output_dir / "checkpoints" / f"step-{step}" / STATE_FILE).read_text())["cpu_threads"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_resume_continues_with_the_uninterrupted_losses(demo_store, demo_dir, tmp_path, workers):
    env = {**os.environ, "DEMO_DIR": str(demo_dir), "OMP_NUM_THREADS": str(RUN_THREADS)}
    steps = 9  # odd: the last checkpoint is the final step's, not one of the every-2 ones
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *run_args(killed, steps, workers)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_checkpoints(str(killed)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    resumed_at = list_checkpoints(str(killed))[-1][0]
    assert resumed_at < steps, "the run finished before it could be killed"

    # Rerun where torch has another thread count (another machine, OMP_NUM_THREADS, or code that ran before).
    with torch_threads(RERUN_THREADS):
        resumed = train_here(killed, steps, workers)
        assert torch.get_num_threads() == RERUN_THREADS, "the trainer gives the caller its thread count back"
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith(f"step-{resumed_at}")
    assert resumed.steps == steps - resumed_at

    reference = tmp_path / "reference"
    with torch_threads(RUN_THREADS):  # uninterrupted, on the killed run's threads
        train_here(reference, steps, workers)
    got, want = read_metrics(killed), read_metrics(reference)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(resumed_at + 1, steps + 1):
        assert got[step] == want[step], f"step {step} after resuming at {resumed_at}"
    provenance = json.loads((killed / "training_provenance.json").read_text())
    assert provenance["steps"] == steps and provenance["resumed_from"] == resumed.resumed_from
    # The rows of both invocations, the ones the uninterrupted run trained on; every step-N/ carries its provenance.
    uninterrupted = json.loads((reference / "training_provenance.json").read_text())
    assert provenance["rows"] == uninterrupted["rows"] and provenance["rows"]["count"] > 0
    step_provenance = json.loads((killed / "checkpoints" / f"step-{resumed_at}" / "training_provenance.json")
                                 .read_text())
    assert step_provenance["steps"] == resumed_at and step_provenance["config"] == provenance["config"]
    assert recorded_threads(killed, steps) == RUN_THREADS, "the resumed run records the threads it computed with"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_cpu_threads_chooses_the_threads_over_the_count_of_the_run_it_resumes(demo_store, tmp_path):
    out = tmp_path / "run"
    with torch_threads(RERUN_THREADS):
        train_here(out, 1, 0, f"train.cpu_threads={RUN_THREADS}")
        assert recorded_threads(out, 1) == RUN_THREADS
        train_here(out, 2, 0, f"train.cpu_threads={RERUN_THREADS}")
        assert recorded_threads(out, 2) == RERUN_THREADS
        assert torch.get_num_threads() == RERUN_THREADS


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        if complete:
            (path / STATE_FILE).write_text("{}")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4]
    assert resolve_resume("auto", str(tmp_path)).endswith("step-4")
    assert resolve_resume("none", str(tmp_path)) is None
    assert resolve_resume("auto", str(tmp_path / "elsewhere")) is None
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-6"), str(tmp_path))
