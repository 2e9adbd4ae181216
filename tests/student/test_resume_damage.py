"""Resuming after damage a crash or a full disk leaves: a checkpoint file cut short, a metrics line cut mid-write.

`train.resume: auto` skips a checkpoint that does not load (warning which file and why) and resumes from the one
before it, with the losses of the uninterrupted run; it never starts over silently. A metrics line cut by a kill is
dropped; a damaged line in the middle of the log is an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.cli import main
from pipeline.data.errors import UsageError
from student.checkpoint import checkpoint_problem
from student.metrics import open_metrics
from tests.student.test_resume import read_metrics, run_args

STEPS = 4  # checkpoints at steps 2 and 4 (run_args saves every 2 steps and keeps them all)


@pytest.fixture(scope="module")
def finished_run(demo_store, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4; tests damage copies of it."""
    out = tmp_path_factory.mktemp("damage") / "run"
    assert main(["train", *run_args(out, STEPS, 0)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def cut_short(path) -> None:
    """Keep the first half of the file, as a full disk or an interrupted copy leaves it."""
    os.truncate(path, os.path.getsize(path) // 2)


def train_again(capsys, output_dir, *extra: str, steps: int = STEPS) -> tuple[int, str]:
    code = main(["train", *run_args(output_dir, steps, 0), *extra])
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin"])
def test_a_cut_newest_checkpoint_is_skipped_and_the_one_before_resumes_with_the_uninterrupted_losses(
        capsys, finished_run, run_copy, damaged):
    step_4 = run_copy / "checkpoints" / "step-4"
    cut_short(step_4 / damaged)
    code, err = train_again(capsys, run_copy)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(step_4) in warnings[0] and f"{damaged} is cut short" in warnings[0], err
    provenance = json.loads((run_copy / "training_provenance.json").read_text())
    assert provenance["resumed_from"].endswith("step-2")
    assert read_metrics(run_copy) == read_metrics(finished_run)
    assert checkpoint_problem(str(step_4)) is None, "the rerun saved step 4 whole again"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_when_no_checkpoint_loads_resume_fails_naming_each_instead_of_starting_over(capsys, finished_run, run_copy):
    for step in (2, 4):
        cut_short(run_copy / "checkpoints" / f"step-{step}" / "model.safetensors")
    code, err = train_again(capsys, run_copy)
    assert code == 2 and "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: no checkpoint under") and "--resume none" in error
    assert "step-4: model.safetensors is cut short" in error and "step-2: model.safetensors is cut short" in error
    assert read_metrics(run_copy) == read_metrics(finished_run), "nothing was trained or logged"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_explicit_resume_path_that_does_not_load_names_the_file(capsys, run_copy):
    step_4 = run_copy / "checkpoints" / "step-4"
    cut_short(step_4 / "optimizer.bin")
    code, err = train_again(capsys, run_copy, "--resume", str(step_4))
    assert code == 2 and "Traceback" not in err and "warning:" not in err
    assert err.strip().count("\n") == 0, err
    assert f"checkpoint {step_4} does not load: optimizer.bin is cut short" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_metrics_line_cut_by_a_kill_does_not_block_resume(capsys, finished_run, run_copy):
    metrics = run_copy / "metrics.jsonl"
    os.truncate(metrics, os.path.getsize(metrics) - 40)  # the step-4 record, cut mid-write
    code, err = train_again(capsys, run_copy, steps=6)
    assert code == 0, err
    assert f"warning: {metrics} line 4 is cut short" in err
    got, before = read_metrics(run_copy), read_metrics(finished_run)
    assert sorted(got) == [1, 2, 3, 5, 6], "the cut record is gone; the run went on from its step-4 checkpoint"
    assert all(got[step] == before[step] for step in (1, 2, 3))


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UsageError, match=f"{metrics} line 2 is not a metrics record"):
        open_metrics(str(metrics), 3)
    assert metrics.read_text().count("\n") == 3, "the log is left as it was"


def test_a_last_record_without_its_newline_keeps_a_line_of_its_own(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    with open_metrics(str(metrics), 2) as f:
        f.write('{"step": 3, "loss": 1.0}\n')
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
