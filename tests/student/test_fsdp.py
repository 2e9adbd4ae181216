"""The IFT stage sharded by FSDP (manifests/accelerate/fsdp.yaml) over two processes: it trains, writes sharded
resumable checkpoints, resumes from one with the uninterrupted run's losses, and saves a whole student that loads.

accelerate shards with FSDP only on accelerator devices; launched on CPU processes it trains DDP instead (see
fsdp_cpu_worker.py), and the trainer refuses such a launch. The CPU variant therefore runs through
fsdp_cpu_worker.py, which gives the CPU processes the state accelerate gives GPU ones: torch's FSDP2 then shards over
gloo. With two CUDA devices the same runs are launched as on a cluster, with nothing in between.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from pipeline.data.errors import UsageError
from tests.conftest import REPO
from tests.student.fsdp_cpu_worker import SEPARATOR
from tests.student.test_multiprocess import free_port

IFT_EXPERIMENT = REPO / "manifests" / "experiments" / "demo_ift.yaml"
FSDP_CONFIG = REPO / "manifests" / "accelerate" / "fsdp.yaml"
CPU_WORKER = REPO / "tests" / "student" / "fsdp_cpu_worker.py"
# Wall-clock figures of a run, not part of its arithmetic.
TIMING_KEYS = {"samples_per_s", "data_wait_fraction"}
STEPS = 3  # checkpoints at 2 and 3; the resumed run trains step 3 again
GPUS = torch.cuda.device_count()


@pytest.fixture(scope="module")
def earlier_stage(demo_dir, tmp_path_factory):
    """A student as an earlier stage leaves it (weights, tokenizer, image processor), new from the demo's vision
    encoder and LLM: what demo_ift.yaml's model.init_from names, without running the PT and VPT stages first."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from student.model import OlaStudent

    parts = demo_dir / "assets" / "student"
    out = tmp_path_factory.mktemp("vpt")
    tokenizer = AutoTokenizer.from_pretrained(parts / "tokenizer")
    torch.manual_seed(0)
    model = OlaStudent.from_parts(str(parts / "vision"), str(parts / "llm"), tasks=[], vision_feature_layer=-2,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    AutoImageProcessor.from_pretrained(parts / "vision").save_pretrained(out)
    return out


def ift_settings(earlier_stage, out, resume: str | None = None) -> list[str]:
    """demo_ift.yaml's stage (next-token loss only, LLM + projector trained), shortened."""
    return [f"output_dir={out}", f"model.init_from={earlier_stage}", f"train.max_steps={STEPS}", "train.save_every=2",
            "train.keep_checkpoints=0", "data.num_workers=0", "data.batch_size=1", "train.trackers=[]",
            *([f"train.resume={resume}"] if resume else [])]


def train_command(settings: list[str]) -> list[str]:
    return ["train", "--config", str(IFT_EXPERIMENT), "--quiet", *(f"--set={s}" for s in settings)]


def launch_fsdp(device: str, demo_dir, *runs: list[str]) -> str:
    """Run each `pipeline` command line of `runs` under fsdp.yaml on two processes; return what they printed.

    On CPU the runs share one launch (see fsdp_cpu_worker.py); on CUDA each is its own launch, as on a cluster.
    """
    env = {**os.environ, "DEMO_DIR": str(demo_dir), "PYTHONPATH": str(REPO)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer then falls back to CPU (gloo) on a machine with a GPU too
        programs = [[str(CPU_WORKER), *[arg for run in runs for arg in (*run, SEPARATOR)][:-1]]]
    else:
        programs = [["-m", "pipeline", *run] for run in runs]
    printed = ""
    for program in programs:
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes",
             "2", "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
             *program],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        printed += result.stdout
    return printed


def read_metrics(output_dir) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in map(json.loads, lines)}


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        GPUS < 2, reason=f"FSDP over two processes on CUDA needs two GPUs (NCCL runs one rank per GPU); this machine "
                         f"has {GPUS}. The cpu variant runs the same stage sharded over gloo")),
])
def test_ift_stage_trains_resumes_and_saves_under_fsdp(demo_dir, earlier_stage, tmp_path, device):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    printed = launch_fsdp(device, demo_dir, train_command(ift_settings(earlier_stage, full)),
                          train_command(ift_settings(earlier_stage, resumed, str(full / "checkpoints" / "step-2"))))
    # One summary per run, not one per rank.
    assert re.findall(r"^trained \d+ steps(?: \(resumed)?", printed, re.M) == [
        f"trained {STEPS} steps", "trained 1 steps (resumed"], printed

    provenance = json.loads((full / "training_provenance.json").read_text())
    assert provenance["distributed_type"] == "FSDP" and provenance["world_size"] == 2
    assert provenance["steps"] == STEPS and math.isfinite(provenance["final_loss"]["lm"])
    # fsdp.yaml asks for SHARDED_STATE_DICT: each rank writes its own shard of the model and optimizer state.
    for step in (2, STEPS):
        for kind in ("pytorch_model_fsdp_0", "optimizer_0"):
            shards = sorted(p.name for p in (full / "checkpoints" / f"step-{step}" / kind).glob("*.distcp"))
            assert shards == ["__0_0.distcp", "__1_0.distcp"], (step, kind, shards)

    got, want = read_metrics(resumed), read_metrics(full)
    assert sorted(got) == [STEPS]
    saved, again = weights(full), weights(resumed)
    assert sorted(saved) == sorted(again)
    if device == "cpu":
        for step in got:
            assert got[step] == want[step], f"step {step} after resuming at 2"
        for name in saved:
            assert torch.equal(saved[name], again[name]), name
    else:  # CUDA kernels and NCCL need not add in the same order twice
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step} after resuming at 2"
        for name in saved:
            torch.testing.assert_close(saved[name], again[name], rtol=1e-4, atol=1e-6, msg=name)

    # The saved student is whole: every tensor at its full size, gathered from both ranks' shards. The frozen
    # vision encoder is still the demo's; the trained LLM moved.
    from student.checkpoint import load_student

    loaded = load_student(str(full))[0].state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[name], saved[name]) for name in saved)
    vision, llm = (weights(demo_dir / "assets" / "student" / part) for part in ("vision", "llm"))
    for name, tensor in vision.items():
        assert torch.equal(saved[f"vision.{name}"], tensor), name
    for name, tensor in llm.items():
        assert saved[f"llm.{name}"].shape == tensor.shape, name
    assert not torch.equal(saved["llm.model.layers.0.mlp.down_proj.weight"],
                           llm["model.layers.0.mlp.down_proj.weight"])


def test_an_fsdp_launch_that_accelerate_runs_unsharded_is_refused(earlier_stage, tmp_path, monkeypatch):
    from student.config import load_experiment
    from student.trainer import build_training

    # What `accelerate launch --config_file fsdp.yaml` sets; on CPU (here one process) accelerate does not shard.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_experiment(str(IFT_EXPERIMENT), ift_settings(earlier_stage, tmp_path / "run"))
    with pytest.raises(UsageError, match="asks for FSDP, but accelerate runs this launch as NO on cpu"):
        build_training(cfg)
