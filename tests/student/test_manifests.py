"""Every experiment manifest loads strictly; the demo stage twins run PT -> VPT -> IFT on the demo store."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data.errors import UsageError
from student.config import load_experiment
from tests.conftest import REPO

EXPERIMENTS = sorted((REPO / "manifests" / "experiments").glob("*.yaml"))
PAPER_LAYERS = {"depth": [18, 20], "seg": [10, 18], "gen": [12, 20]}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_manifest_loads_strictly(path):
    cfg = load_experiment(str(path))
    assert cfg.name == path.stem


@pytest.mark.parametrize("stage, batch, lr, trainable", [
    ("pt", 256, 1e-3, {"projector", "predictors", "task_tokens"}),
    ("vpt", 128, 2e-5, {"llm", "projector"}),
    ("ift", 128, 2e-5, {"llm", "projector"}),
])
def test_paper_stages_have_the_paper_settings(stage, batch, lr, trainable):
    cfg = load_experiment(str(REPO / "manifests" / "experiments" / f"olavlm_{stage}.yaml"))
    gpus = 8  # the manifests' comments size the global batch for 8 processes
    assert cfg.data.batch_size * cfg.train.grad_accum * gpus == batch
    assert cfg.train.lr == lr and cfg.train.warmup_ratio == 0.03 and cfg.train.mixed_precision == "bf16"
    assert set(cfg.model.trainable) == trainable
    if stage == "pt":
        assert {n: t.layers for n, t in cfg.model.tasks.items()} == PAPER_LAYERS
        assert cfg.model.vision == "openai/clip-vit-large-patch14-336"
    else:
        assert cfg.model.tasks == {} and cfg.data.store is None and cfg.model.init_from


def test_paper_pt_shares_the_logit_scale_per_task_and_gathers_256_infonce_keys():
    cfg = load_experiment(str(REPO / "manifests" / "experiments" / "olavlm_pt.yaml"))
    assert cfg.model.logit_scale_per == "task"  # the reference has one scale per task
    processes = 8  # the reference's pretrain.sh: 32 per GPU on 8 GPUs, no accumulation
    # coupled_loss gathers one micro-batch from every process; accumulated micro-batches add no keys.
    assert cfg.data.batch_size * processes == 256 and cfg.train.grad_accum == 1


def test_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    text = (REPO / "manifests" / "experiments" / "demo_pt.yaml").read_text()
    path.write_text(text.replace("save_every: 10", "save_evry: 10"))
    with pytest.raises(UsageError, match="train.save_evry: unknown field"):
        load_experiment(str(path))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_stages_run_in_sequence(demo_store, demo_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import train_from_config

    previous = None
    for stage in ("pt", "vpt", "ift"):
        out = tmp_path / stage
        overrides = [f"output_dir={out}", "train.max_steps=2", "data.num_workers=0", "train.trackers=[]"]
        if previous is not None:
            overrides.append(f"model.init_from={previous}")
        result = train_from_config(str(REPO / "manifests" / "experiments" / f"demo_{stage}.yaml"), overrides,
                                   progress=False)
        assert result.steps == 2 and math.isfinite(result.final_loss["loss"]), stage
        if stage == "pt":
            assert {"depth", "seg", "gen"} <= set(result.final_loss)
        else:
            assert set(result.final_loss) == {"loss", "lm", "total"}, result.final_loss
            before, after = load_file(previous / "model.safetensors"), load_file(out / "model.safetensors")
            llm = [k for k in after if k.startswith("llm.") and "layers.0.self_attn.q_proj" in k]
            assert llm and not torch.equal(before[llm[0]], after[llm[0]]), "the LLM did not train"
            for name in ("task_tokens.gen", "task_tokens.depth", "task_tokens.seg"):
                assert torch.equal(before[name], after[name]), f"{name} changed in {stage}"
        previous = out
