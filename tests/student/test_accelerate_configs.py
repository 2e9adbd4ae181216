"""The accelerate configs documented for GPU clusters load with accelerate's own config reader (which refuses
unknown keys). Training: DDP over two CPU processes in test_multiprocess.py, under fsdp.yaml in test_fsdp.py;
zero2.yaml needs deepspeed and GPUs."""

from __future__ import annotations

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED")])
def test_accelerate_config_loads(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "manifests" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    assert config.mixed_precision == "bf16"
